"""Quantized models beside float ones on this machine: size on disk, decode tok/s at batch 1 and 8, prefill tok/s,
validation bits per byte (and its change vs fp32), with the memory-bandwidth roofline of every format beside them.

    python benchmarks/quant_bench.py                         # trains a run first (deepsail run --minutes 2)
    python benchmarks/quant_bench.py --run runs/default      # an existing `deepsail run` folder
    python benchmarks/quant_bench.py --kernels               # the per-layer kernel table (which path runs where)
    python benchmarks/quant_bench.py --run runs/default --rounds 1 --steps 8   # smoke test

Goals (from the issue): int8 decode >= 1.6x fp32 at batch 1 with < 1% bpb increase; int4 >= 2.5x with < 5%.

Two models, one table:
- the trained run (`deepseek-v3-mini`, `deepsail run`'s default), where bits per byte mean something: val split of
  the run's own data, the same batches for every format;
- `deepseek-v3-small` with random weights, for speed only (bpb of random weights says nothing).
Formats: fp32 and bf16 (`ds.from_pretrained(dtype=)`), int8, int8-dynamic and int4 (`deepsail quantize`'s code,
written to a folder and loaded back through `ds.from_pretrained`, the path `deepsail generate/serve` take), and
int4 after QAT (`deepsail finetune RUN --data RUN/data --qat int4`, its RUN/quantized; trained run only; it also
trained --qat-steps more steps than fp32 did, which the table notes). int4's group size is the largest of 64 / 32
that divides every layer's input width (mini's q_lora_rank 96 needs 32).

Decode: prefill a 16-token prompt, then `--steps` greedy steps through the paged KV cache (the model's decode
path, no sampler), tok/s = batch·steps / time. Prefill: one 512-token sequence into an empty cache. Every round
measures every format in turn, the order reversed each round (machine load hits all alike); the table gives
medians over rounds and prints the load average before and after (2 shared cores: a busy neighbour halves a
number). Roofline: the bytes one decode step must read (every weight a token touches: attention, dense MLPs,
shared experts, the routed experts the step's rows chose — at batch 8 nearly all of them — the head, and the KV
cache) over this machine's read bandwidth, measured here (sum of a 512 MB tensor, best of 5).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import deepsail as ds
from deepsail.compress import QuantConfig, QuantExperts, QuantLinear, quantize, save_quantized
from deepsail.model import ModelConfig, Transformer
from deepsail.model.layers import linear
from deepsail.model.moe import Experts

DEEPSAIL = str(Path(sys.executable).with_name("deepsail"))  # the CLI of the venv running this


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- machine ---------------------------------------------------------------------------------------------------------
def read_bandwidth() -> float:
    """Bytes/s a sum over a 512 MB fp32 tensor reads (best of 5): what a decode step's weight reads can reach."""
    a = torch.ones(128 << 20)
    a.sum()
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t0))
    return best


def step_bytes(model: nn.Module, batch: int, context: int) -> float:
    """Bytes one decode step of `batch` rows reads: every weight a token uses once, the routed experts the rows
    chose (expected distinct experts: E·(1 - (1 - k/E)^batch)), the head, and the rows' KV cache."""
    c = model.config
    total = 0.0
    for name, m in model.named_modules():
        if name.startswith("mtp.") or isinstance(m, nn.Embedding):
            continue
        own = sum(t.numel() * t.element_size() for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])
        if isinstance(m, Experts | QuantExperts):
            E, k = c.n_routed_experts, c.num_experts_per_tok
            own *= (1 - (1 - k / E) ** batch) if E else 0
        elif name.endswith("e_score_correction_bias"):
            continue
        total += own
    if c.tie_word_embeddings:
        total += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    per_token = (
        (c.kv_lora_rank + c.qk_rope_head_dim) if c.attention_type == "mla" else 2 * c.num_key_value_heads * c.head_dim
    )
    total += batch * context * per_token * c.num_hidden_layers * model.embed_tokens.weight.element_size()
    return total


# --- the models ------------------------------------------------------------------------------------------------------
def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


def group_size_for(model: nn.Module) -> int:
    widths = {m.in_features for m in model.modules() if isinstance(m, nn.Linear)}
    widths |= {
        s for m in model.modules() if isinstance(m, Experts) for s in (m.gate_up_proj.shape[2], m.down_proj.shape[2])
    }
    return next(g for g in (64, 32) if all(w % g == 0 for w in widths))


def build_formats(src: Path, work: Path, qat_dir: Path | None) -> dict[str, tuple[nn.Module, float, str]]:
    """format -> (model, MB on disk, note)."""
    out: dict[str, tuple[nn.Module, float, str]] = {}
    fp32 = ds.from_pretrained(src, dtype="fp32")
    out["fp32"] = (fp32, folder_mb(src) if _saved_dtype(src) == "float32" else float("nan"), "")
    bf16_dir = work / "bf16"
    ds.from_pretrained(src, dtype="fp32").save_pretrained(bf16_dir, dtype=torch.bfloat16)
    out["bf16"] = (ds.from_pretrained(bf16_dir, dtype="bf16"), folder_mb(bf16_dir), "")
    g = group_size_for(fp32)
    # the default keeps lm_head float; "+head" quantizes it too (the measurement behind that default)
    for method, skip in (
        ("int8", ("lm_head",)),
        ("int8-dynamic", ("lm_head",)),
        ("int4", ("lm_head",)),
        ("int8", ()),
        ("int4", ()),
    ):
        name = method + ("" if skip else " +head")
        qdir = work / name.replace(" ", "")
        cfg = QuantConfig(method=method, group_size=g, skip=skip)
        save_quantized(quantize(copy.deepcopy(fp32), cfg), qdir, copy_from=src)
        out[name] = (ds.from_pretrained(qdir), folder_mb(qdir), f"g{g}" if method == "int4" else "")
    if qat_dir is not None:
        out["int4-qat"] = (ds.from_pretrained(qat_dir), folder_mb(qat_dir), f"g{g}")
        # the QAT run's own float weights: what the extra training did, apart from quantization
        out["qat run's fp32"] = (ds.from_pretrained(qat_dir.parent / "model"), folder_mb(qat_dir.parent / "model"), "")
    return out


def _saved_dtype(folder: Path) -> str:
    import json

    return json.loads((folder / "config.json").read_text()).get("dtype", "float32")


@torch.inference_mode()
def decode_tok_s(model: nn.Module, batch: int, steps: int, prompt: int = 16) -> float:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (batch, prompt), generator=g)
    cache = model.new_cache(batch, prompt + steps + 1)
    tok = model(ids, cache=cache, last_logits_only=True).logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = model(tok, cache=cache, last_logits_only=True).logits[:, -1].argmax(-1, keepdim=True)
    return batch * steps / (time.perf_counter() - t0)


@torch.inference_mode()
def prefill_tok_s(model: nn.Module, tokens: int = 512) -> float:
    ids = torch.randint(10, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(1, tokens)
    t0 = time.perf_counter()
    model(ids, cache=cache, last_logits_only=True)
    return tokens / (time.perf_counter() - t0)


def val_bpb(model: nn.Module, data_dir: Path, batches: int) -> float:
    from deepsail.data.loader import eval_batches
    from deepsail.data.tokenizer import Tokenizer, token_byte_lengths
    from deepsail.train.pretrain import evaluate

    token_bytes = token_byte_lengths(Tokenizer.load(data_dir.parent / "tokenizer"))
    val = eval_batches(data_dir, 8, 256, "val", max_batches=batches, device=torch.device("cpu"))
    return evaluate(model, val, token_bytes, torch.device("cpu"), "fp32")["bpb"]


def measure(models: dict[str, tuple[nn.Module, float, str]], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    samples: dict[str, dict[str, list[float]]] = {f: {"b1": [], "b8": [], "prefill": []} for f in models}
    for m, _, _ in models.values():  # warm-up: the first calls build kernels' caches and spin up threads
        decode_tok_s(m, 1, 2)
        decode_tok_s(m, 8, 2)
        prefill_tok_s(m, 64)
    names = list(models)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            m = models[name][0]
            samples[name]["b1"].append(decode_tok_s(m, 1, args.steps))
            samples[name]["b8"].append(decode_tok_s(m, 8, args.steps))
            samples[name]["prefill"].append(prefill_tok_s(m))
    return {f: {k: statistics.median(v) for k, v in s.items()} for f, s in samples.items()}


def table(title: str, models: dict, speed: dict, bpb: dict | None, bw: float, notes: list[str]) -> str:
    ctx = 16 + 32
    fp = speed["fp32"]
    lines = [
        f"### {title}",
        "",
        "| format | size MB | decode b1 tok/s | x fp32 | roofline b1 | % roof | decode b8 tok/s | x fp32 | roofline b8 "
        "| prefill 512 tok/s | x fp32 |" + (" val bpb | Δ vs fp32 |" if bpb else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if bpb else ""),
    ]
    for name, (m, mb, note) in models.items():
        s = speed[name]
        roof1, roof8 = bw / step_bytes(m, 1, ctx), 8 * bw / step_bytes(m, 8, ctx)
        row = (
            f"| {name}{f' ({note})' if note else ''} | {mb:.1f} | {s['b1']:.1f} | {s['b1'] / fp['b1']:.2f} | "
            f"{roof1:.0f} | {100 * s['b1'] / roof1:.0f}% | {s['b8']:.1f} | {s['b8'] / fp['b8']:.2f} | {roof8:.0f} | "
            f"{s['prefill']:.0f} | {s['prefill'] / fp['prefill']:.2f} |"
        )
        if bpb:
            row += f" {bpb[name]:.4f} | {100 * (bpb[name] / bpb['fp32'] - 1):+.2f}% |"
        lines.append(row)
    return "\n".join(lines + [""] + [f"- {n}" for n in notes] + [""])


def trained_run(args: argparse.Namespace, work: Path) -> Path:
    if args.run:
        return Path(args.run)
    run = work / "run"
    print(f"training a run: deepsail run --minutes {args.minutes} --out {run}", flush=True)
    subprocess.run(
        [DEEPSAIL, "run", "--minutes", str(args.minutes), "--out", str(run)], check=True, stdout=subprocess.DEVNULL
    )
    return run


def qat_run(run: Path, src: Path, work: Path, group_size: int, steps: int) -> Path:
    out = work / "qat"
    cmd = [
        DEEPSAIL,
        "finetune",
        str(src),
        "--data",
        str(run / "data"),
        "--out",
        str(out),
        "--qat",
        "int4",
        "--qat-group-size",
        str(group_size),
        "--steps",
        str(steps),
        "--eval-every",
        "0",
        "--ewc-batches",
        "0",
        "--lr",
        "3e-4",
    ]
    print("QAT: deepsail " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out / "quantized"


def models_main(args: argparse.Namespace) -> None:
    from deepsail.train.checkpoint import resolve_checkpoint

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load()}", flush=True)
    bw = read_bandwidth()
    print(f"read bandwidth (sum of 512 MB): {bw / 1e9:.1f} GB/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = trained_run(args, work)
        src = resolve_checkpoint(run)
        g = group_size_for(ds.from_pretrained(src))
        qat = qat_run(run, src, work, g, args.qat_steps) if args.qat_steps else None
        out = []
        trained = build_formats(src, work / "trained", qat)
        speed = measure(trained, args)
        bpb = {f: val_bpb(m, run / "data", args.eval_batches) for f, (m, _, _) in trained.items()}
        out.append(
            table(
                f"trained run: {trained['fp32'][0].config.num_hidden_layers}-layer deepseek-v3-mini from `{run}`",
                trained,
                speed,
                bpb,
                bw,
                [
                    f"int4-qat: `deepsail finetune --qat int4` for {args.qat_steps} more steps (lr 3e-4) on the run's "
                    "data"
                ],
            )
        )
        del trained
        small_dir = work / "small"
        Transformer(ModelConfig.preset("deepseek-v3-small")).save_pretrained(small_dir)
        small = build_formats(small_dir, work / "small-q", None)
        out.append(
            table(
                "deepseek-v3-small, random weights (speed only)",
                small,
                measure(small, args),
                None,
                bw,
                ["int4-qat runs int4's kernels: same speed as int4"],
            )
        )
    print(f"\nload after: {load()}\n")
    print("\n".join(out))


# --- kernels ---------------------------------------------------------------------------------------------------------
SHAPES = {  # deepseek-v3-small's projections: (out, in)
    "q_b_proj": (768, 128),
    "kv_b_proj": (1024, 64),
    "o_proj": (512, 512),
    "dense gate/up": (1408, 512),
    "dense down": (512, 1408),
    "expert down": (512, 256),
    "lm_head": (8192, 512),
}


def kernel_sides(out_f: int, in_f: int, g: int) -> dict[str, Any]:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=False)
    nn.init.normal_(lin.weight, std=0.02)
    w, wb = lin.weight.detach(), lin.weight.detach().bfloat16()
    q8, q4 = QuantLinear.from_float(lin, "int8", g), QuantLinear.from_float(lin, "int4", g)
    sides: dict[str, Any] = {
        "fp32 linear": lambda x: linear(x, w),
        "bf16 F.linear": lambda x: F.linear(x.bfloat16(), wb),
        "ours int8": q8,
        "ours int4": q4,
        "ours int8-dyn": QuantLinear.from_float(lin, "int8-dynamic", g),
    }
    s8 = q8.weight_scale.float()
    sides["op int8 fp32 x"] = lambda x: torch._weight_int8pack_mm(x, q8.weight, s8)
    run4 = _int4_fp32_run(q4)
    sides["op int4 fp32 x"] = run4
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return sides
    for label, config in (
        ("int8", Int8WeightOnlyConfig()),
        ("int4", PrototypeInt4WeightOnlyConfig(group_size=g)),
        ("int8-dyn", Int8DynamicActivationInt8WeightConfig()),
    ):
        for dtype in (torch.float32, torch.bfloat16):
            m = copy.deepcopy(lin).to(dtype)
            quantize_(m, config)
            tag = "fp32" if dtype == torch.float32 else "bf16"
            sides[f"torchao {label} {tag}"] = _cast_then(m, dtype)
    return sides


def _cast_then(module: nn.Module, dtype: torch.dtype) -> Any:
    return lambda x: module(x.to(dtype))


def _int4_fp32_run(q4: QuantLinear) -> Any:
    from deepsail.compress.quantize import _int4_cpu_run

    return _int4_cpu_run(q4.stored(), torch.float32)


def time_calls(fn: Any, x: torch.Tensor, budget_s: float) -> tuple[int, float]:
    t0 = time.perf_counter()
    fn(x)
    once = max(time.perf_counter() - t0, 1e-6)
    n = max(1, min(200, int(budget_s / once)))
    t0 = time.perf_counter()
    for _ in range(n):
        fn(x)
    return n, (time.perf_counter() - t0) / n


@torch.inference_mode()
def kernels_main(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load()}", flush=True)
    rows_list = [int(r) for r in args.rows.split(",")]
    for label, (n, k) in SHAPES.items():
        sides = kernel_sides(n, k, 64 if k % 64 == 0 else 32)
        for rows in rows_list:
            x = torch.randn(rows, k)
            for fn in sides.values():
                fn(x)
            times: dict[str, list[float]] = {s: [] for s in sides}
            names = list(sides)
            for r in range(args.rounds):
                for s in names if r % 2 == 0 else names[::-1]:
                    times[s].append(time_calls(sides[s], x, 0.01)[1])
            med = {s: statistics.median(v) for s, v in times.items()}
            base = med["fp32 linear"]
            cells = " | ".join(f"{s} {1e6 * t:.0f} ({base / t:.2f}x)" for s, t in med.items())
            print(f"[{label} {n}x{k}] rows={rows}: {cells}", flush=True)
    print(f"load after: {load()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="an existing `deepsail run` folder (default: train one)")
    p.add_argument("--minutes", type=float, default=2.0, help="length of the run trained when --run is not given")
    p.add_argument("--qat-steps", type=int, default=60, help="QAT finetune steps for int4-qat (0: skip the column)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    p.add_argument("--eval-batches", type=int, default=16, help="val batches of 8x256 tokens for bpb")
    p.add_argument("--kernels", action="store_true", help="the per-layer kernel table instead")
    p.add_argument("--rows", default="1,8,512", help="--kernels: activation rows")
    args = p.parse_args()
    kernels_main(args) if args.kernels else models_main(args)


if __name__ == "__main__":
    main()
