"""Ten thousand decode steps in one sequence, eager and compiled: does memory stay flat, and how does the step time
grow with the context?

    python benchmarks/decode_soak.py                 # deepseek-v3-mini fp32, batch 1, 10k steps each side
    python benchmarks/decode_soak.py --steps 2000    # shorter

Each side runs in its own child process (RSS belongs to a process), one after the other; printed: RSS every 1,000
steps, the growth from step 1,000 to the end (the first thousand include the compile and the allocator's warm-up),
and tok/s per thousand steps (the attention over a growing context takes over from the weights as L grows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(kind: str, steps: int) -> dict:
    from deepsail.infer.graphs import CompiledDecode
    from deepsail.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.preset("deepseek-v3-mini")
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, steps + 64))
    model = Transformer(cfg).eval()
    step = CompiledDecode(model) if kind == "compiled" else None
    cache = model.new_cache(1, steps + 64)
    marks = []
    with torch.no_grad():
        logits = model(torch.randint(0, cfg.vocab_size, (1, 32)), cache=cache).logits[:, -1]
        t0 = time.perf_counter()
        for i in range(steps):
            token = logits.argmax(-1, keepdim=True)
            logits = step(token, cache) if step is not None else model(token, cache=cache).logits[:, -1]
            if i % 1000 == 0 or i == steps - 1:
                marks.append((i, rss_mib(), time.perf_counter() - t0))
    return {"kind": kind, "marks": marks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--child", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(soak(args.child, args.steps)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    for kind in ("eager", "compiled"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--steps", str(args.steps)], capture_output=True, text=True
        )
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        marks = json.loads(out.stdout.strip().splitlines()[-1])["marks"]
        print(f"\n{kind}: step, RSS MiB, tok/s over the last thousand")
        for (i, rss, t), (_, _, t_prev) in zip(marks[1:], marks):
            print(f"  {i:>6} {rss:8.1f} {(1000 if i % 1000 == 0 else i % 1000) / (t - t_prev):8.0f}")
        print(f"  RSS growth from step {marks[1][0]} to {marks[-1][0]}: {marks[-1][1] - marks[1][1]:+.1f} MiB")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
