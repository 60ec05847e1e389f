"""Catastrophic forgetting, with and without elastic weight consolidation.

Train on task A, then on task B from the A model, plainly and with `--ewc-lambda` (each lambda given); report A's
and B's validation loss at each point and the forgetting ratio

    forgetting = (loss_A after B - loss_A after A) / (loss_A before A - loss_A after A)

(0: nothing of what A taught was lost; 1: all of it), and how much of B each run learned. Tasks: next-token loss on
the source of two standard-library package families (module_chunks: default `email` then `asyncio`), 5% of each
task's chunks held out for validation. The base is a small model pretrained here on the embedded corpus (or
`--base`, any model folder).

    python benchmarks/forgetting.py                        # ~4 min on 2 CPU cores
    python benchmarks/forgetting.py --lambdas 1e3,1e4,1e5 --steps-a 150 --steps-b 150
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from deepsail.data.loader import eval_batches
from deepsail.data.tasks import module_chunks
from deepsail.data.tokenizer import Tokenizer, token_byte_lengths
from deepsail.train import TrainConfig, pretrain
from deepsail.train.pretrain import evaluate
from deepsail.tune.finetune import TuneConfig, finetune
from deepsail.tune.load import from_pretrained


def write_task(family: str, folder: Path) -> Path:
    """train.jsonl of the family's train chunks; its held-out files become the prepared data's val split below."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [r for split in ("train", "val") for r in module_chunks(split, families=12)[0] if r["label"] == family]
    if not rows:
        raise SystemExit(f"no stdlib package family {family!r}")
    path = folder / f"{family}.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    return path


def val_loss(model_dir: Path, data_dir: Path, seq_len: int) -> float:
    model = from_pretrained(model_dir, dtype="fp32")
    tok = Tokenizer.load(model_dir)
    batches = eval_batches(data_dir, 8, seq_len, "val", max_batches=20)
    return evaluate(model, batches, token_byte_lengths(tok), torch.device("cpu"), "fp32")["loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="", help="a model folder to start from (default: pretrain one here)")
    ap.add_argument("--task-a", default="email")
    ap.add_argument("--task-b", default="asyncio")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps-a", type=int, default=120)
    ap.add_argument("--steps-b", type=int, default=120)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lambdas", default="1e2,1e3,1e4", help="EWC strengths to try, comma-separated")
    ap.add_argument("--work", default="", help="work folder (default: a temporary one)")
    args = ap.parse_args()
    console = Console(stderr=True)
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - the runs' own progress lines
    work = Path(args.work or tempfile.mkdtemp(prefix="forgetting-"))
    print(f"cpu: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}")
    print(f"work folder: {work}")
    t0 = time.perf_counter()

    if args.base:
        base = Path(args.base)
    else:
        import warnings

        from deepsail.data import default_corpus
        from deepsail.data.prepare import prepare

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            texts = [d.text for d in default_corpus("train", max_bytes=3_000_000)]
            Tokenizer.train(texts, vocab_size=2048).save(work / "tok")
        prepare(None, work / "tok", work / "corpus", max_bytes=3_000_000, progress=False)
        cfg = TrainConfig(
            data=str(work / "corpus"),
            out=str(work / "pretrain"),
            model_preset="deepseek-v3-debug",
            steps=args.pretrain_steps,
            batch_size=16,
            seq_len=args.seq_len,
            lr=3e-3,
            eval_every=0,
            ckpt_every=0,
            warmup_steps=20,
        )
        pretrain(cfg, console=quiet)
        base = work / "pretrain"
        console.print(f"pretrained the base in {time.perf_counter() - t0:.0f} s")

    tasks = {name: write_task(fam, work / "tasks") for name, fam in (("A", args.task_a), ("B", args.task_b))}
    common = dict(
        batch_size=8,
        seq_len=args.seq_len,
        lr=args.lr,
        min_lr=args.lr / 10,
        warmup_steps=10,
        eval_every=0,
        ckpt_every=0,
        weight_decay=0.0,
        log_every=20,
    )

    def tune(start: Path, task: str, out: str, steps: int, lam: float = 0.0, fisher_batches: int = 0) -> Path:
        cfg = TrainConfig(out=str(work / out), steps=steps, **common)
        t = TuneConfig(task="lm", ewc_lambda=lam, ewc_batches=fisher_batches, val_fraction=0.05)
        finetune(start, cfg, t, data=str(tasks[task]), steps_given=True, console=quiet)
        return work / out / "model"

    model_a = tune(base, "A", "A", args.steps_a, fisher_batches=32)
    data = {k: work / k / "data" for k in ("A",)}
    rows = []
    runs = {"B, plain": tune(model_a, "B", "B-plain", args.steps_b)}
    for lam in [float(x) for x in args.lambdas.split(",") if x]:
        runs[f"B, EWC lambda={lam:g}"] = tune(model_a, "B", f"B-ewc-{lam:g}", args.steps_b, lam=lam)
    data["B"] = work / "B-plain" / "data"
    base_dir = base / "model" if (base / "model").is_dir() else base
    if not (base_dir / "config.json").is_file():
        from deepsail.train.checkpoint import resolve_checkpoint

        base_dir = resolve_checkpoint(base)
    points = {"base": base_dir, "after A": model_a, **runs}
    for name, folder in points.items():
        rows.append((name, val_loss(folder, data["A"], args.seq_len), val_loss(folder, data["B"], args.seq_len)))

    before_a, after_a = rows[0][1], rows[1][1]
    learned_a = before_a - after_a
    print(
        f"\ntask A = {args.task_a} source, task B = {args.task_b} source; val loss (nats/token); "
        f"{time.perf_counter() - t0:.0f} s in all"
    )
    print(f"{'model':<24} {'A val loss':>11} {'B val loss':>11} {'forgetting of A':>16} {'B learned':>10}")
    b_start = rows[1][2]
    plain_gain = b_start - rows[2][2]
    for name, la, lb in rows:
        forgetting = (la - after_a) / learned_a if name.startswith("B") and learned_a > 0 else float("nan")
        learned_b = (b_start - lb) / plain_gain if name.startswith("B") and plain_gain > 0 else float("nan")
        print(f"{name:<24} {la:>11.4f} {lb:>11.4f} {forgetting:>16.1%} {learned_b:>10.1%}")
    plain = (rows[2][1] - after_a) / learned_a if learned_a > 0 else float("nan")
    for name, la, _ in rows[3:]:
        ratio = ((la - after_a) / learned_a) / plain if plain > 0 else float("nan")
        print(f"{name}: forgetting {ratio:.2f}x that of plain fine-tuning")
    print("B learned: the share of plain fine-tuning's drop in B's loss that the run achieved (EWC's price).")


if __name__ == "__main__":
    main()
