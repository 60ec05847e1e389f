"""Early exit's speed-vs-quality curve: tok/s against val bits/byte over confidence thresholds (issue 12).

    python benchmarks/early_exit.py RUN                  # a run trained with --arch exit_loss_weight=... on
                                                         # --data-cache's tokenizer and data (ablations.py's)
    python benchmarks/early_exit.py --train-minutes 4    # first trains deepseek-v3-mini with exit_loss_weight 0.3

For each threshold (1.0 = the full model, never exiting), on the same held-out windows of the run's data:
- quality: teacher-forced bits/byte with every token decoded one at a time through `early_exit_logits`, so each
  prediction comes from the layer it exited at and the cache holds the propagated keys/values of skipped layers;
- speed: greedy generation of --new-tokens at batch 1, median of --repeats, alternating thresholds.
The calibrated threshold (the lowest within --tolerance of the full model's loss on other windows) is marked.
Writes early_exit.md and early_exit.png next to RUN.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
THRESHOLDS = (1.0, 0.95, 0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", type=Path)
    p.add_argument("--train-minutes", type=float, default=4.0)
    p.add_argument("--out", type=Path, default=Path("runs/early_exit"))
    p.add_argument("--data-cache", type=Path, default=Path("runs/ablations-data"))
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tolerance", type=float, default=0.02)
    a = p.parse_args()

    import torch

    from deepsail.data.loader import TokenStream
    from deepsail.data.tokenizer import Tokenizer, token_byte_lengths
    from deepsail.model import from_pretrained
    from deepsail.model.depth import calibrate_exit, early_exit_logits, exit_scores
    from deepsail.train.checkpoint import resolve_checkpoint
    from deepsail.train.config import TrainConfig
    from deepsail.train.pretrain import pretrain

    torch.set_num_threads(max(1, torch.get_num_threads()))
    from ablations import prepare_data  # the same cached corpus (tokenizer + data) as the ablation table

    data_dir = prepare_data(a.data_cache, 4096)
    if a.run is None:
        cfg = TrainConfig(
            data=str(data_dir), tokenizer=str(a.data_cache / "tokenizer"), model_preset="deepseek-v3-mini",
            arch=("exit_loss_weight=0.3",), steps=None, minutes=a.train_minutes, lr=3e-3, min_lr=3e-4,
            warmup_steps=30, eval_every=0, eval_batches=4, ckpt_every=0, out=str(a.out / "run"),
        )  # fmt: skip
        a.run = Path(pretrain(cfg).checkpoint)
    model = from_pretrained(resolve_checkpoint(a.run), dtype="fp32").eval()
    if not model.config.exit_loss_weight:
        print("note: this model was trained without exit_loss_weight; its intermediate layers may not be readable")
    token_bytes = token_byte_lengths(Tokenizer.load(a.data_cache / "tokenizer"))
    stream = TokenStream(data_dir, "val")
    span = a.window + 1
    pick = [torch.from_numpy(stream.read(i * span, span).astype("int64")) for i in range(2 * a.windows)]
    calib, held = pick[: a.windows], pick[a.windows :]
    chosen, _ = calibrate_exit(model, calib, a.tolerance, THRESHOLDS[1:])

    rows = {}
    for th in THRESHOLDS:
        runs = [exit_scores(model, ids, th) for ids in held]
        n_tok = sum(len(ids) - 1 for ids in held)
        n_bytes = sum(int(token_bytes[ids[1:]].sum()) for ids in held)
        nats = sum(r["loss"] * (len(ids) - 1) for r, ids in zip(runs, held))
        rows[th] = {"bpb": nats / math.log(2) / n_bytes, "blocks": statistics.mean(r["blocks"] for r in runs),
                    "tok_s": [], "tokens": n_tok}  # fmt: skip
    prompt = held[0][:16]
    for _ in range(a.repeats):
        for th in THRESHOLDS:
            cache = model.new_cache(1, 16 + a.new_tokens + 1, block_size=16)
            with torch.no_grad():
                logits, _ = early_exit_logits(model, prompt[None], cache, 1.0)
                t0 = time.perf_counter()
                for _ in range(a.new_tokens):
                    nxt = logits.argmax(-1, keepdim=True)
                    logits, _ = early_exit_logits(model, nxt, cache, th)
                rows[th]["tok_s"].append(a.new_tokens / (time.perf_counter() - t0))
    L = model.config.num_hidden_layers
    lines = [f"load {os.getloadavg()[0]:.1f} | {a.run} | {L} blocks | calibrated threshold {chosen} "
             f"(tolerance {a.tolerance:.0%})", "", "| threshold | val bpb | blocks run | tok/s (b=1) | speed-up |",
             "|---|---|---|---|---|"]  # fmt: skip
    full = statistics.median(rows[1.0]["tok_s"])
    for th, r in rows.items():
        r["tok_s"] = statistics.median(r["tok_s"])
        mark = " (calibrated)" if th == chosen else (" (full model)" if th == 1.0 else "")
        lines.append(
            f"| {th}{mark} | {r['bpb']:.4f} | {r['blocks']:.2f} / {L} | {r['tok_s']:.1f} | {r['tok_s'] / full:.2f}x |"
        )
    print("\n".join(lines))
    write(rows, chosen, a.out, lines)


def write(rows: dict, chosen: float, out: Path, lines: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepsail.files import atomic_path, atomic_write_text

    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = [r["tok_s"] for r in rows.values()], [r["bpb"] for r in rows.values()]
    ax.plot(xs, ys, "o-")
    for th, r in rows.items():
        ax.annotate(f"{th}" + (" *" if th == chosen else ""), (r["tok_s"], r["bpb"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)  # fmt: skip
    ax.set(xlabel="greedy decode tok/s (batch 1)", ylabel="val bits/byte", title="Early exit: speed vs quality")
    fig.tight_layout()
    with atomic_path(out / "early_exit.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    atomic_write_text(out / "early_exit.md", "\n".join(lines) + "\n\n![curve](early_exit.png)\n")


if __name__ == "__main__":
    main()
