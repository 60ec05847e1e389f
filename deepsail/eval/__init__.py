"""Evaluation: built-in metrics (metrics.py), lm-eval-harness's model class over the batched engine (harness.py),
and `deepsail eval` (cli.py)."""
