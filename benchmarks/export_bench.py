"""Exported graphs beside deepsail on the same weights: onnxruntime generating from the ONNX export, the saved
torch.export program, and deepsail's own eager model — parity and speed.

    python benchmarks/export_bench.py                       # deepseek-v3-mini (MoE) and qwen2 (dense), random weights
    python benchmarks/export_bench.py --run runs/default    # a trained run instead of the MoE preset

Per model: the max |logit| difference of onnxruntime vs deepsail over prefill + 8 decode steps (greedy, a batch of two
prompts of different lengths), the ONNX file size, and, alternating the two sides, batch-1 decode tok/s (onnxruntime's
loop of the exported graph vs deepsail's `generate` with the paged cache) and prefill tok/s of 512 tokens (deepsail
eager vs the torch.export program vs onnxruntime). Both at the same thread count. Note the exported MoE layers run
every expert on every token (a static graph cannot size per-expert slices): E/K x the expert FLOPs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepsail as ds  # noqa: E402
from deepsail.export.onnx import OnnxGenerator, export_onnx  # noqa: E402
from deepsail.export.pt2 import save_program  # noqa: E402
from deepsail.model import ModelConfig, Transformer  # noqa: E402


def deepsail_decode(model: Transformer, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray], float]:
    cache = model.new_cache(1, len(prompt) + steps)
    ids, tokens, logits = torch.tensor([prompt]), [], []
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(steps):
            last = model(ids, cache=cache).logits[0, -1]
            logits.append(last.numpy())
            tokens.append(int(last.argmax()))
            ids = torch.tensor([[tokens[-1]]])
        return tokens, logits, time.perf_counter() - t0


def bench(name: str, model: Transformer, work: Path, threads: int, steps: int, rounds: int) -> list[str]:
    model = model.float().eval()
    onnx_path, pt2_path = work / f"{name}.onnx", work / f"{name}.ds"
    t0 = time.perf_counter()
    export_onnx(model, onnx_path)
    t_onnx = time.perf_counter() - t0
    save_program(model, pt2_path)
    program = ds.load(pt2_path)
    gen = OnnxGenerator(onnx_path, threads=threads)
    V = model.config.vocab_size
    prompts = [list(range(5, 21)), list(range(30, 39))]
    ort_tokens = gen.generate(prompts, 9)
    diff, same = 0.0, True
    for b, p in enumerate(prompts):
        want, want_logits, _ = deepsail_decode(model, p, 9)
        same &= want == ort_tokens[b]
        diff = max(diff, max(float(np.abs(gen.step_logits[s][b] - want_logits[s]).max()) for s in range(9)))

    prompt = [int(x) for x in torch.randint(0, V, (32,), generator=torch.Generator().manual_seed(0))]
    long = torch.randint(0, V, (1, 512), generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {k: [] for k in ("ds_dec", "ort_dec", "ds_pre", "pt2_pre", "ort_pre")}
    feed = {"input_ids": long.numpy(), "attention_mask": np.ones((1, 512), np.int64)}
    feed |= {n: np.zeros((1, 0, *gen.past_shape), np.float32) for n in gen.past_names}
    for _ in range(rounds):
        times["ds_dec"].append(steps / deepsail_decode(model, prompt, steps)[2])
        t0 = time.perf_counter()
        gen.generate([prompt], steps)
        times["ort_dec"].append(steps / (time.perf_counter() - t0))
        with torch.no_grad():
            t0 = time.perf_counter()
            model(long)
            times["ds_pre"].append(512 / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            program(long)
            times["pt2_pre"].append(512 / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        gen.session.run(["logits"], feed)
        times["ort_pre"].append(512 / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in times.items()}
    size = onnx_path.stat().st_size / 2**20
    return [
        f"| {name} | {model.num_params() / 1e6:.1f}M | {size:.0f} MiB ({t_onnx:.0f} s) | {diff:.1e} | "
        f"{'yes' if same else 'NO'} | {med['ds_dec']:.0f} | "
        f"{med['ort_dec']:.0f} ({med['ort_dec'] / med['ds_dec']:.2f}x) | "
        f"{med['ds_pre']:.0f} | {med['pt2_pre']:.0f} ({med['pt2_pre'] / med['ds_pre']:.2f}x) | "
        f"{med['ort_pre']:.0f} ({med['ort_pre'] / med['ds_pre']:.2f}x) |"
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a trained run or model folder (default: the deepseek-v3-mini preset)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {
        "deepseek-v3-mini": ds.from_pretrained(args.run)
        if args.run
        else Transformer(ModelConfig.preset("deepseek-v3-mini")),
        "qwen2-debug": Transformer(ModelConfig.preset("qwen2-1.5b-debug")),
    }
    print(f"torch {torch.__version__}, {args.threads} threads, load {os.getloadavg()}")
    rows = [
        "| model | params | ONNX (export time) | max logit diff ORT vs deepsail | same greedy tokens | deepsail decode "
        "tok/s | ORT decode tok/s | deepsail prefill tok/s | torch.export prefill | ORT prefill |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as work:
        for name, model in models.items():
            rows += bench(name, model, Path(work), args.threads, args.steps, args.rounds)
    print("\n".join(rows))
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
