"""The main job's report: one markdown page (and its loss plot) a person opens after `deepsail run`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from deepsail.files import atomic_write_text
from deepsail.train.metrics import read_metrics, save_plot


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def plot_runs(curves: dict[str, Path], path: Path) -> Path:
    """Train (lm) and validation loss against training minutes, one colour per model: runs given the same time
    budget are compared at equal cost, whatever their step speeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for (name, run_dir), color in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green")):
        rows = _rows(run_dir)
        if not rows:
            continue
        t0 = rows[0]["time"]
        train = [r for r in rows if r["split"] == "train" and "lm_loss" in r]
        val = [r for r in rows if r["split"] == "val" and "loss" in r]
        ax.plot(
            [(r["time"] - t0) / 60 for r in train],
            [r["lm_loss"] for r in train],
            "-",
            color=color,
            alpha=0.6,
            label=f"{name} train",
        )
        ax.plot(
            [(r["time"] - t0) / 60 for r in val], [r["loss"] for r in val], "o-", color=color, ms=4, label=f"{name} val"
        )
    return save_plot(fig, ax, "training time (minutes)", "next-token loss (nats/token)", path)


def write_report(
    run_dir: Path,
    results: dict[str, Any],
    unigram_bpb: float,
    samples: list[tuple[str, str]],
    model_config: Any,
    manifest: dict[str, Any],
    timings: dict[str, float],
) -> Path:
    curves = {"MoE": run_dir} | ({"dense": run_dir / "dense"} if "dense" in results else {})
    plot = plot_runs(curves, run_dir / "report_loss.png")
    moe = results["moe"]
    lines = [
        "# deepsail run",
        "",
        f"A {model_config.model_type} model (MLA + DeepSeekMoE + MTP) trained from scratch on the embedded corpus "
        f"(the Python standard library's source and help text) in {timings['total_s'] / 60:.1f} minutes.",
        "",
        "## Results",
        "",
        "| model | params (active) | steps | tokens | val loss | val ppl | val bits/byte | tok/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    from deepsail.model import from_pretrained

    for name, r in results.items():
        m = from_pretrained(r.checkpoint)
        lines.append(
            f"| {name} | {m.num_params() / 1e6:.2f}M ({m.num_params(active=True) / 1e6:.2f}M) | {r.step} | "
            f"{r.tokens:,} | {r.val_loss:.3f} | {r.val_ppl:.1f} | {r.val_bpb:.3f} | {r.tok_per_s:,.0f} | "
            f"{100 * r.mfu:.1f}% |"
        )
    lines += [
        f"| unigram baseline | – | – | – | – | – | {unigram_bpb:.3f} | – | – |",
        "",
        f"Bits per byte: the model needs **{moe.val_bpb:.3f}** bits per byte of validation text; a unigram model "
        f"(train-split token frequencies) needs {unigram_bpb:.3f}, {unigram_bpb / moe.val_bpb:.2f}x as many. "
        f"MFU is against {moe.peak_flops / 1e12:.2f} TFLOP/s ({moe.peak_flops_source}), {moe.precision} on "
        f"{moe.device}.",
        "",
        f"![loss curves]({plot.name})",
        "",
        "## Samples",
        "",
        "Temperature 0.7, top-k 40, 80 new tokens, from the final checkpoint.",
        "",
    ]
    for prompt, text in samples:
        lines += ["```python", prompt + text, "```", ""]
    splits = manifest["splits"]
    lines += [
        "## Data",
        "",
        f"{manifest['bytes'] / 1e6:.1f} MB of text; train {splits['train']['tokens']:,} tokens "
        f"({splits['train']['docs']} documents), validation {splits['val']['tokens']:,} tokens "
        f"({splits['val']['docs']} documents, split by file). Tokenizer: byte-level BPE, "
        f"{manifest['tokenizer']['vocab_size']} tokens, trained in {timings['tokenizer_s']:.1f}s.",
        "",
        "## Model config",
        "",
        "```json",
        json.dumps({k: v for k, v in model_config.to_dict().items() if v not in (None, {}, [])}, indent=1),
        "```",
        "",
        "## Files",
        "",
        f"- final checkpoint: `{os.path.relpath(moe.checkpoint, run_dir)}` "
        "(an HF directory: `deepsail generate`, `deepsail serve` and `transformers` load it)",
        "- metrics: `metrics.jsonl`, `tensorboard/`, `loss.png`; resolved config: `run_config.json`",
        "",
    ]
    return atomic_write_text(run_dir / "report.md", "\n".join(lines))
