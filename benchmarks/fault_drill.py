"""Fault drill: kill a training run with SIGKILL at N random moments, resume it each time, and check that it ends
bitwise identical to a run that was never interrupted.

    python benchmarks/fault_drill.py                    # 10 kills of a 40-step run, about 3 minutes on 2 cores
    python benchmarks/fault_drill.py --kills 25 --steps 80

Each kill picks a random step ahead of the last checkpoint. Half of them land at a random moment after the run
passes it (mid-step, mid-evaluation or mid-checkpoint, as it falls), half while a checkpoint is being written (the
drill waits for the checkpoint's temporary folder to appear, then kills). Every segment is a fresh `deepsail pretrain`
process (the first one fresh, each later one with --resume), exactly as a user would restart after a crash.
At the end: final weights, optimizer state and validation loss against the uninterrupted run, the metrics file
checked for duplicated or missing steps, and the tally.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

CLI = [sys.executable, "-c", "from deepsail.cli import app; app()"]


def prepare_data(root: Path) -> Path:
    from deepsail.data import Tokenizer, default_corpus, prepare

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = Tokenizer.train([d.text for d in default_corpus("train", max_bytes=400_000)], vocab_size=512)
    tok.save(root / "tokenizer")
    prepare(None, root / "tokenizer", root / "data", max_bytes=400_000, progress=False)
    return root / "data"


def flags(data: Path, out: Path, steps: int) -> list[str]:
    return [
        "pretrain",
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "3",
        "--precision",
        "fp32",
        "--ckpt-every",
        "2",
        "--eval-every",
        "10",
        "--eval-batches",
        "2",
        "--log-every",
        "2",
        "--keep-last",
        "3",
    ]


def start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the drill runs two processes at times: no oversubscription
    return subprocess.Popen(CLI + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def mid_write(ckpts: Path) -> bool:
    return ckpts.is_dir() and any(".tmp-" in p.name for p in ckpts.iterdir())


def latest_step(ckpts: Path) -> int:
    pointer = ckpts / "latest"
    return int(pointer.read_text().strip().split("_")[1]) if pointer.is_file() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (1 min)")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare_data(root)
        t0 = time.perf_counter()
        ref = start(flags(data, root / "reference", args.steps))
        _, err = ref.communicate()
        assert ref.returncode == 0, err.decode()[-3000:]
        run_s = time.perf_counter() - t0
        print(f"uninterrupted run: {args.steps} steps in {run_s:.1f} s")

        out = root / "drilled"
        ckpts = out / "checkpoints"
        tally = []
        resume = False
        for k in range(args.kills):
            aim_mid_write = k % 2 == 1
            before = latest_step(ckpts)
            if before >= args.steps - 2:
                break
            reach = max(2, (args.steps - before) // max(1, args.kills - k))  # spread the kills over the run
            target = rng.randint(before + 1, min(args.steps - 1, before + reach))
            child = start(flags(data, out, args.steps) + (["--resume"] if resume else []))
            caught, fired_at = False, None
            while child.poll() is None:
                if latest_step(ckpts) >= target:
                    if not aim_mid_write:
                        fired_at = fired_at or time.perf_counter() + rng.uniform(0.0, 0.3)  # a random moment after
                        if time.perf_counter() >= fired_at:
                            break
                    elif mid_write(ckpts):
                        caught = True
                        break
                time.sleep(0.0003)
            if child.poll() is not None:  # it finished before the kill: nothing left to interrupt
                _, err = child.communicate()
                assert child.returncode == 0, err.decode()[-3000:]
                tally.append(("finished", latest_step(ckpts), False))
                break
            caught = caught or mid_write(ckpts)
            child.send_signal(signal.SIGKILL)
            child.wait()
            tally.append(("killed", latest_step(ckpts), caught))
            resume = latest_step(ckpts) > 0
        if not tally or tally[-1][0] != "finished":
            child = start(flags(data, out, args.steps) + (["--resume"] if resume else []))
            _, err = child.communicate()
            assert child.returncode == 0, err.decode()[-3000:]

        # --- the verdict ---
        ref_ck = (
            root / "reference" / "checkpoints" / (root / "reference" / "checkpoints" / "latest").read_text().strip()
        )
        got_ck = ckpts / (ckpts / "latest").read_text().strip()
        a, b = load_file(ref_ck / "model.safetensors"), load_file(got_ck / "model.safetensors")
        weights_equal = a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
        oa = torch.load(ref_ck / "optimizer.pt", weights_only=True)["state"]
        ob = torch.load(got_ck / "optimizer.pt", weights_only=True)["state"]
        optim_equal = oa.keys() == ob.keys() and all(
            torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i] if torch.is_tensor(oa[i][k])
        )
        ref_sum = json.loads((root / "reference" / "summary.json").read_text())
        got_sum = json.loads((out / "summary.json").read_text())
        steps = [
            json.loads(line)["step"]
            for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"
        ]
        metrics_ok = steps == sorted(set(steps)) == list(range(2, args.steps + 1, 2))

    kills = [t for t in tally if t[0] == "killed"]
    print(f"\n{'segment':>8} {'outcome':>9} {'latest checkpoint':>18} {'mid-checkpoint':>15}")
    for i, (what, step, mid) in enumerate(tally, 1):
        print(f"{i:>8} {what:>9} {f'step {step}':>18} {'yes' if mid else '':>15}")
    print(f"\nkills: {len(kills)} ({sum(m for *_, m in kills)} mid-checkpoint), resumes: {len(kills)}")
    print(
        f"final step {got_sum['step']} vs {ref_sum['step']} | weights bitwise equal: {weights_equal} | "
        f"AdamW state bitwise equal: {optim_equal} | val loss {got_sum['val_loss']:.6f} vs "
        f"{ref_sum['val_loss']:.6f} | metrics rows each step once: {metrics_ok}"
    )
    ok = weights_equal and optim_equal and got_sum["val_loss"] == ref_sum["val_loss"] and metrics_ok
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
