"""Distillation: a small student distilled from a bigger teacher vs the same student trained alone.

    python benchmarks/distill_bench.py                      # ~15 min on 2 CPU cores: pretrains its own teacher
    python benchmarks/distill_bench.py runs/default         # a teacher you have (run or model folder), its tokenizer
    python benchmarks/distill_bench.py --steps 40 --teacher-minutes 0.5 --eval-batches 4   # smoke test

Goal (issue 13): the distilled student reaches a lower validation bits/byte than the same student trained alone,
and intermediate feature matching adds to logit KD.

Setup, all on the embedded corpus (`--max-bytes` of it, the standard library's source split by file):
- teacher: `deepseek-v3-mini` (DeepSeek-V3 design: MLA, 8 routed experts top-2 + 1 shared, 9.9M params at vocab
  4096) pretrained here for `--teacher-minutes` (or the folder given);
- student: a dense Llama-style model (`llama-3-8b-debug` reshaped to `--student-layers` x `--student-width`: GQA,
  SwiGLU), another architecture, depth and width than the teacher, with the teacher's tokenizer;
- the same student (same seed: same initial weights, same batches in the same order, same lr schedule) trained
  (a) alone on next-token cross-entropy, (b) with logit KD, (c) KD + feature matching, (d) KD + progressive
  feature matching, each for `--steps`; with `--equal-wall-clock`, (e) alone again for as long as the slowest
  distillation run took (a distilled step pays for the teacher's forward, so alone gets more steps in that time).
Every run is validated on the same windows of the validation split (`--eval-batches` of them, fixed order).

Prints the table (val bits/byte, ratio to the student alone at equal steps, steps, wall clock, tok/s) and the load
average around each run (2 shared cores: a busy neighbour slows a run, which moves the wall-clock column, never the
equal-steps numbers), and writes distill_bench.png: val bits/byte against step for every run, the teacher's as a
line (in WORK/seedN/).

Measured with the defaults (2 shared CPU cores, load 3-4 from other work; the teacher got 46 steps in 3.5 min, val
2.428 bits/byte), val bits/byte, seed 0 | seed 1:
    (a) student alone                  2.5648 | 2.6096
    (b) logit KD                       2.5060 | 2.5065    (0.977 | 0.961 of alone)
    (c) KD + features                  2.4737 | 2.4752    (0.964 | 0.949; 1.3% | 1.2% below KD)
    (d) KD + progressive features      2.4963 | 2.4900    (0.973 | 0.954)
17 min in all for seed 0 (teacher included), 15 min for seed 1 (teacher reused through --work).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console

from deepsail.data.tokenizer import Tokenizer
from deepsail.model import ModelConfig
from deepsail.train import TrainConfig, pretrain
from deepsail.train.metrics import read_metrics, save_plot
from deepsail.tune.distill import DistillConfig, distill, student_config


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher", nargs="?", default="", help="a teacher run or model folder (default: pretrain one)")
    ap.add_argument("--teacher-minutes", type=float, default=3.5)
    ap.add_argument("--teacher-preset", default="deepseek-v3-mini")
    ap.add_argument("--student-preset", default="llama-3-8b-debug")
    ap.add_argument("--student-layers", type=int, default=4)
    ap.add_argument("--student-width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=130)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0, help="the students' seed: initial weights and batch order")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--vocab-size", type=int, default=2048, help="the tokenizer trained for a teacher made here")
    ap.add_argument("--max-bytes", type=int, default=3_000_000, help="bytes of the embedded corpus used")
    ap.add_argument(
        "--equal-wall-clock", action="store_true", help="add run (e): alone for as long as the slowest distillation"
    )
    ap.add_argument("--work", default="", help="work folder (default: a temporary one)")
    args = ap.parse_args()
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - the runs' own progress lines
    work = Path(args.work or tempfile.mkdtemp(prefix="distill-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"cpu: {os.cpu_count()} cores, load {load()}, torch {torch.__version__} {torch.get_num_threads()} threads")
    print(f"work folder: {work}", flush=True)
    t0 = time.perf_counter()

    from deepsail.data.corpus import default_corpus
    from deepsail.data.prepare import prepare

    if args.teacher:
        from deepsail.train.checkpoint import resolve_checkpoint

        teacher = resolve_checkpoint(args.teacher)
        tok_dir = teacher
    else:
        tok_dir = work / "tokenizer"
        if not (tok_dir / "tokenizer.json").is_file():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                texts = [d.text for d in default_corpus("train", max_bytes=args.max_bytes)]
                Tokenizer.train(texts, vocab_size=args.vocab_size).save(tok_dir)
    data = work / "data"
    if not (data / "manifest.json").is_file():
        prepare(None, tok_dir, data, max_bytes=args.max_bytes, progress=False)
    vocab = Tokenizer.load(tok_dir).vocab_size
    common = dict(
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        min_lr=args.lr / 10,
        warmup_steps=20,
        eval_batches=args.eval_batches,
        log_every=10,
        ckpt_every=0,
        keep_last=1,
        seed=args.seed,
    )
    if not args.teacher:
        teacher_run = work / "teacher"
        if not (teacher_run / "summary.json").is_file():
            cfg = TrainConfig(
                data=str(data),
                tokenizer=str(tok_dir),
                out=str(teacher_run),
                steps=None,
                minutes=args.teacher_minutes,
                eval_every=0,
                **{**common, "batch_size": 16, "warmup_steps": 30, "seed": 0},
            )
            mcfg = ModelConfig.preset(args.teacher_preset).replace(vocab_size=vocab)
            r = pretrain(cfg, model_config=mcfg, console=quiet)
            print(f"teacher: {args.teacher_preset}, {r.step} steps of 16x{args.seq_len} in {r.elapsed_s:.0f} s")
        from deepsail.train.checkpoint import resolve_checkpoint

        teacher = resolve_checkpoint(teacher_run)
    print(f"setup done in {time.perf_counter() - t0:.0f} s, load {load()}", flush=True)

    shape = dict(student_layers=args.student_layers, student_width=args.student_width)
    scfg = student_config(args.student_preset, vocab, layers=args.student_layers, width=args.student_width)
    train = dict(common, steps=args.steps, eval_every=args.eval_every)
    runs_dir = work / f"seed{args.seed}"  # the teacher and the data are shared by every seed run in `work`
    runs: dict[str, dict] = {}

    def record(name: str, out: Path, result: dict, before: str) -> None:
        runs[name] = {"out": out, **result, "load": f"{before} -> {load()}"}
        print(
            f"  {name:<34} val bpb {result['val_bpb']:.4f} | {result['step']} steps in {result['elapsed_s']:.0f} s "
            f"| load {runs[name]['load']}",
            flush=True,
        )

    # A few steps first, untimed: the process's first steps pay for kernel selection, allocator warm-up and the
    # peak-FLOP/s measurement, which would otherwise land on whichever run goes first.
    warm = TrainConfig(data=str(data), tokenizer=str(tok_dir), out=str(runs_dir / "warm-up"), **{**train, "steps": 5})
    pretrain(warm, model_config=scfg, console=quiet)
    before = load()
    out = runs_dir / "alone"
    cfg = TrainConfig(data=str(data), tokenizer=str(tok_dir), out=str(out), **train)
    r = pretrain(cfg, model_config=scfg, console=quiet)
    record("(a) student alone", out, r.to_dict(), before)
    variants = {
        "(b) logit KD": dict(gamma=0.0),
        "(c) KD + features": dict(gamma=1.0),
        "(d) KD + progressive features": dict(gamma=1.0, progressive=True),
    }
    teacher_val: dict[str, float] = {}
    for name, kw in variants.items():
        before = load()
        out = runs_dir / name.split(")")[0].strip("(")
        d = distill(
            TrainConfig(out=str(out), **train),
            DistillConfig(teacher=str(teacher), student_preset=args.student_preset, **shape, **kw),
            data=str(data),
            console=quiet,
        )
        teacher_val = d.teacher_val
        record(name, out, d.train, before)
    if args.equal_wall_clock:
        slowest = max(v["elapsed_s"] for k, v in runs.items() if k[1] in "bcd")
        before = load()
        out = runs_dir / "alone-wall"
        wall = {**train, "steps": None, "minutes": slowest / 60, "eval_every": 0}
        cfg = TrainConfig(data=str(data), tokenizer=str(tok_dir), out=str(out), **wall)
        r = pretrain(cfg, model_config=scfg, console=quiet)
        record("(e) student alone, equal wall clock", out, r.to_dict(), before)

    # --- the table ---
    alone = runs["(a) student alone"]["val_bpb"]
    print(
        f"\nteacher {teacher} ({args.teacher_preset if not args.teacher else 'given'}): val bpb "
        f"{teacher_val.get('bpb', float('nan')):.4f} | student {args.student_preset} {args.student_layers} layers x "
        f"{args.student_width} ({scfg.model_type}), batch {args.batch_size}x{args.seq_len}, lr {args.lr:g}; "
        f"val: the same {args.eval_batches} batches for every run; {time.perf_counter() - t0:.0f} s in all"
    )
    print(f"{'run':<36} {'val bpb':>8} {'vs alone':>9} {'steps':>6} {'wall s':>7} {'tok/s':>7}  load (1-min avg)")
    for name, v in runs.items():
        print(
            f"{name:<36} {v['val_bpb']:>8.4f} {v['val_bpb'] / alone:>9.3f} {v['step']:>6} {v['elapsed_s']:>7.0f} "
            f"{v['tok_per_s']:>7,.0f}  {v['load']}"
        )
    kd, feat = runs["(b) logit KD"]["val_bpb"], runs["(c) KD + features"]["val_bpb"]
    prog = runs["(d) KD + progressive features"]["val_bpb"]
    print(
        f"at equal steps, val bits/byte: logit KD {alone - kd:+.4f} ({(alone - kd) / alone:+.1%}) below the student "
        f"alone; adding features {(kd - feat) / kd:+.1%} below KD alone, progressive features {(kd - prog) / kd:+.1%}"
    )
    print(f"plot: {plot(runs, teacher_val, runs_dir / 'distill_bench.png')}")


def plot(runs: dict[str, dict], teacher_val: dict[str, float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for name, v in runs.items():
        rows = [r for r in read_metrics(Path(v["out"]) / "metrics.jsonl") if r["split"] == "val"]
        if rows:
            label = f"{name}: {v['val_bpb']:.3f} ({v['elapsed_s']:.0f} s)"
            ax.plot([r["step"] for r in rows], [r["bpb"] for r in rows], "o-", ms=3, label=label)
    if teacher_val:
        ax.axhline(teacher_val["bpb"], color="k", ls="--", lw=1, label=f"teacher: {teacher_val['bpb']:.3f}")
    return save_plot(fig, ax, "student optimizer step", "validation bits per byte", path)


if __name__ == "__main__":
    main()
