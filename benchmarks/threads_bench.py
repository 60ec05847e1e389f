"""Batch-1 decode tok/s beside a busy core, on torch's default threads (one per core) and on the free cores
(deepsail/threads.py), alternating.

    python benchmarks/threads_bench.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import torch

from deepsail.model import ModelConfig, Transformer
from deepsail.threads import free_cores


@torch.no_grad()
def decode(model: Transformer, prompt: torch.Tensor, new_tokens: int = 32) -> float:
    """tok/s of greedy decoding `new_tokens` after `prompt` with the paged cache."""
    t0 = time.perf_counter()
    cache = model.new_cache(1, prompt.shape[1] + new_tokens)
    out = model(prompt, cache=cache, last_logits_only=True).logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens):
        out = model(out, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
    return new_tokens / (time.perf_counter() - t0)


def main() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("deepseek-v3-small")).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 32))
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores, load average {os.getloadavg()[0]:.2f}, free cores idle: {free_cores()[0]}")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # another job on one core
    try:
        time.sleep(0.5)
        free = free_cores()[0]
        print(f"with one busy-loop process: free cores = {free}")
        tps: dict[int, list[float]] = {cores: [], free: []}
        for r in range(6):  # one warm-up round
            for threads in tps:
                torch.set_num_threads(threads)
                t = decode(model, prompt)
                if r:
                    tps[threads].append(t)
    finally:
        busy.kill()
    for threads, v in tps.items():
        label = "free cores" if threads == free else "one per core (torch's default)"
        print(f"{threads} thread(s), {label}: {statistics.median(v):.1f} tok/s")
    print(f"ratio free/default: {statistics.median(tps[free]) / statistics.median(tps[cores]):.2f}x")


if __name__ == "__main__":
    main()
