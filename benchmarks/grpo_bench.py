"""GRPO steps per hour: `deepsail grpo` beside trl's GRPOTrainer (transformers generate), same model, same work.

    python benchmarks/grpo_bench.py                         # a random deepseek-v3-mini + 4096-token BPE, 3 rounds
    python benchmarks/grpo_bench.py runs/r1/sft/model       # a real policy (the recipe's SFT model): real rewards
    python benchmarks/grpo_bench.py --steps 3 --rounds 1 --prompts 2 --generations 4 --max-tokens 8   # smoke test

Goal (issue 13): deepsail >= 3x trl's steps per hour on CPU.

The same on both sides: the weights (one HF folder, read by each side's own loader), the task (arithmetic, the
problems of the same train split, R1's chat prompt through the same chat template), P prompts x G samples per
step at temperature 1 up to the same number of new tokens, the reward (`deepsail.tune.tasks.reward`: accuracy +
0.1 x format), group-normalised advantages, the DAPO token-level loss, beta (default 0: trl's default, no reference
pass), one optimizer step per batch of rollouts (mu = 1), AdamW at the same lr, bf16 autocast for the training
forward/backward where the CPU has bf16 (`--precision`). Generation: trl's runs under the same bf16 autocast
(accelerate wraps the model's forward); deepsail's samples in the weights' fp32, which measured faster here (64 rows
of deepseek-v3-mini: 1.40 s fp32 vs 1.60 s under bf16 autocast, whose weight casts outweigh its small matmuls).

What differs is the machinery, which is the point: trl generates with `model.generate` on a left-padded batch (no
paged cache, every row runs until the longest is done); deepsail's rollouts go through its continuous-batching
engine (paged KV, finished rows leave the batch, each problem's prompt prefilled once and its KV blocks shared by
its G samples through the prefix cache), through the compiled decode step (`--compile-rollouts`; the
first step, which compiles it, is left out of the median like trl's first; `--eager-rollouts` to measure without),
and its training forward runs the head on reply tokens only and each group's shared prompt once.

Each (side, round) is a fresh subprocess; rounds alternate which side goes first. A run's step time is the median
over its steps after the first (the first warms the allocator and kernels); the table gives the median over rounds
and steps per hour from it, plus the machine's load average before each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_model(folder: Path, preset: str) -> Path:
    import warnings

    import torch

    from deepsail.data import Tokenizer, default_corpus
    from deepsail.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset).replace(num_nextn_predict_layers=0, vocab_size=4096)
    Transformer(cfg).save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Tokenizer.train([d.text for d in default_corpus("train", max_bytes=2_000_000)], vocab_size=4096).save(folder)
    return folder


# --- one side, in its own process ------------------------------------------------------------------------------------
def run_deepsail(a: argparse.Namespace, out: Path) -> list[float]:
    from rich.console import Console

    from deepsail.train.config import TrainConfig
    from deepsail.train.metrics import read_metrics
    from deepsail.tune.grpo import GRPOConfig, grpo

    cfg = TrainConfig(
        out=str(out), steps=a.steps, lr=a.lr, min_lr=a.lr, warmup_steps=0, weight_decay=0.0, log_every=1,
        eval_every=0, ckpt_every=0, seed=a.seed, precision=a.precision, grad_clip=1.0,
    )  # fmt: skip
    gcfg = GRPOConfig(
        prompts_per_step=a.prompts, num_generations=a.generations, max_completion_tokens=a.max_tokens, beta=a.beta,
        loss_type="dapo", eval_problems=1, compile_rollouts=not a.eager_rollouts,
    )  # fmt: skip
    grpo(a.model, cfg, gcfg, console=Console(quiet=True))
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    return [r["step_time_s"] for r in rows]


def run_trl(a: argparse.Namespace, out: Path) -> list[float]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from deepsail.precision import resolve_precision
    from deepsail.tune import tasks as T

    problems = T.problems("arithmetic", "train", a.prompts * (a.steps + 1), seed=a.seed)
    by_question = {p.question: p for p in problems}
    data = Dataset.from_list([{"prompt": T.messages(p), "question": p.question} for p in problems])

    def reward(prompts, completions, question, **_):
        return [T.reward(c[0]["content"], by_question[q]) for c, q in zip(completions, question)]

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    bf16 = resolve_precision(a.precision, torch.device("cpu")) == "bf16"
    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=a.prompts * a.generations, num_generations=a.generations,
        max_completion_length=a.max_tokens, temperature=1.0, learning_rate=a.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, beta=a.beta, loss_type="dapo", scale_rewards="group", max_steps=a.steps,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=bf16, seed=a.seed,
        gradient_accumulation_steps=1, shuffle_dataset=False, dataloader_num_workers=0, max_grad_norm=1.0,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    tok.padding_side = "left"
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()]
    )
    trainer.train()
    return times


# --- the driver ------------------------------------------------------------------------------------------------------
def load() -> float:
    return os.getloadavg()[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", help="An HF model folder with a chat-template tokenizer (default: random).")
    p.add_argument("--preset", default="deepseek-v3-mini", help="Preset of the random model when none is given.")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--precision", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eager-rollouts", action="store_true", help="deepsail samples without --compile-rollouts")
    p.add_argument("--side", choices=("deepsail", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.side:  # a child: one side, one round
        out = Path(tempfile.mkdtemp(prefix=f"grpo-{a.side}-"))
        times = (run_deepsail if a.side == "deepsail" else run_trl)(a, out / "run")
        Path(a.result).write_text(json.dumps(times))
        return

    tmp = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    if a.model is None:
        a.model = str(make_model(tmp / "model", a.preset))
    print(f"model {a.model} | {a.prompts} prompts x {a.generations} samples, <= {a.max_tokens} new tokens, beta "
          f"{a.beta}, {a.steps} steps x {a.rounds} rounds | {os.cpu_count()} cores")  # fmt: skip
    medians: dict[str, list[float]] = {"deepsail": [], "trl": []}
    for r in range(a.rounds):
        for side in ("deepsail", "trl") if r % 2 == 0 else ("trl", "deepsail"):
            result = tmp / f"{side}-{r}.json"
            before = load()
            argv = [sys.executable, __file__, a.model, "--side", side, "--result", str(result)]
            for k in ("steps", "prompts", "generations", "max_tokens", "lr", "beta", "precision", "seed"):
                argv += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
            argv += ["--eager-rollouts"] if a.eager_rollouts else []
            subprocess.run(argv, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times = json.loads(result.read_text())
            step = statistics.median(times[1:] or times)
            medians[side].append(step)
            print(
                f"round {r} {side:8s}: median step {step:6.2f} s over {len(times) - 1} steps, first step "
                f"{times[0]:.1f} s (load {before:.2f})"
            )
    ds_s, trl_s = statistics.median(medians["deepsail"]), statistics.median(medians["trl"])
    print()
    print("| side | s / step (median) | steps / hour |")
    print("|---|---|---|")
    print(f"| deepsail grpo | {ds_s:.2f} | {3600 / ds_s:,.0f} |")
    print(f"| trl GRPOTrainer | {trl_s:.2f} | {3600 / trl_s:,.0f} |")
    print(f"\ndeepsail / trl steps per hour: {trl_s / ds_s:.2f}x (goal >= 3x)")


if __name__ == "__main__":
    main()
