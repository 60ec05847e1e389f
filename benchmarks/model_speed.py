"""Training and decode speed of deepsail beside HF transformers, same weights, measured alternately in one run.

    python benchmarks/model_speed.py            # the ~40M DeepSeek-V3 config of the issue, on CPU (or CUDA if there)
    python benchmarks/model_speed.py --quick    # fewer repetitions
    python benchmarks/model_speed.py --profile  # plus where a training step's and a decode step's time goes

Model: hidden 512, 8 layers, MLA (q latent 128, kv latent 64, rope 32), 8 routed experts top-2 + 1 shared, first
layer dense (the `deepseek-v3-small` preset without MTP, since transformers' DeepseekV3ForCausalLM trains none).
Training: fwd + bwd + AdamW on batch 8x256, fp32 and bf16 autocast. Decode: greedy, 32-token prompt + 64 new
tokens, batch 1 and 8 in fp32, batch 1 with bf16 weights, KV cache on both sides. Each figure is the median over
rounds in which the two implementations take turns, so machine noise hits both alike.

Batch-1 decode is set beside its limits: the memory roofline (active weight bytes / copy bandwidth) and the time
of the step's matrix-vector products alone, through F.linear (HF's route) and through deepsail's `linear` (the
weight-major route where the BLAS runs it faster). On small CPUs these are far below the roofline: the BLAS does
not stream weights from DRAM at copy bandwidth for one row.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch

import deepsail as ds
from deepsail.infer.graphs import CompiledDecode
from deepsail.model import ModelConfig
from deepsail.train.allocator import keep_freed_memory
from deepsail.train.metrics import cpu_name, peak_flops


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step_fn(model, hf: bool, ids, precision: str, device: str):
    # The fused AdamW kernel (CUDA, and CPU since torch 2.4) on both sides, as deepsail's trainer uses it
    # (train/optim.py): the comparison is of model code.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    amp = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    x, y = ids[:, :-1], ids[:, 1:]

    def step() -> None:
        with amp:
            if hf:
                logits = model(x).logits
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            else:
                loss = model(x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@torch.no_grad()
def ds_greedy(model, prompt, new_tokens: int, step=None) -> torch.Tensor:
    """Greedy decoding with the paged cache; `step` (a CompiledDecode) runs the decode steps compiled."""
    B, T = prompt.shape
    cache = model.new_cache(B, T + new_tokens)
    logits = model(prompt, cache=cache, last_logits_only=True).logits
    out = [logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        logits = step(out[-1], cache) if step is not None else model(out[-1], cache=cache).logits[:, -1]
        out.append(logits.argmax(-1, keepdim=True))
    return torch.cat(out, 1)


@torch.no_grad()
def hf_greedy(model, prompt, new_tokens: int) -> torch.Tensor:
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, prompt.shape[1] :]


def alternate(fns: dict[str, callable], rounds: int, device: str) -> dict[str, float]:
    """Median seconds per call of each fn, calling them in turn each round (one warm-up round first)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def copy_bandwidth(device: str, nbytes: int = 256 << 20) -> float:
    """Bytes/s of a large tensor copy (read + write), best of 5: the memory roofline for decode."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def decode_matrices(model) -> list[torch.Tensor]:
    """The weight matrices one batch-1 decode step multiplies a vector by, in forward order: every linear layer
    of the main model, and in each MoE layer the first top-k routed experts (the same bytes as any k)."""
    from deepsail.model.moe import Experts

    mats: list[torch.Tensor] = []
    k = model.config.num_experts_per_tok
    for name, module in model.named_modules():
        if name.startswith("mtp"):
            continue
        if isinstance(module, torch.nn.Linear):
            mats.append(module.weight)
        elif isinstance(module, Experts):
            for e in range(k):
                mats += [module.gate_up_proj[e], module.down_proj[e]]
    return mats


@torch.no_grad()
def gemv_limit(model, device: str, rounds: int = 5) -> dict[str, float]:
    """Seconds per token of the decode step's matrix-vector products alone, run back to back, with no attention,
    routing or Python around: through F.linear (what HF runs) and through deepsail's `linear` (which takes the
    weight-major route where this machine's BLAS runs it faster, see model/layers.py).

    Weights that fit in cache run at cache speed, which a real step (touching the whole model) does not get, so
    the whole model is swept each round, as decode does."""
    from deepsail.model.layers import linear

    mats = decode_matrices(model)
    xs = {m.shape[1]: torch.randn(1, m.shape[1], device=device) for m in mats}
    routes = {"F.linear": torch.nn.functional.linear, "deepsail": linear}
    times: dict[str, list[float]] = {k: [] for k in routes}
    for r in range(rounds + 1):
        for name, fn in routes.items():
            sync(device)
            t0 = time.perf_counter()
            for m in mats:
                fn(xs[m.shape[1]], m)
            sync(device)
            if r:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# Where a step's time goes: each aten op's self time, binned. Ops run inside the optimizer step count as optimizer
# whatever they are; the rest by name (the first matching bin wins).
BINS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::_weight_int")),
    ("attention", ("scaled_dot_product", "flash_attention", "aten::_efficient_attention")),
    ("loss", ("log_softmax", "nll_loss", "cross_entropy")),
    (
        "MoE dispatch",
        (
            "index_select",
            "scatter",
            "gather",
            "aten::sort",
            "aten::topk",
            "aten::index",
            "bincount",
            "cumsum",
            "histc",
            "argsort",
            "nonzero",
        ),
    ),
    (
        "copies/casts",
        (
            "aten::copy_",
            "aten::_to_copy",
            "aten::fill_",
            "aten::zero_",
            "aten::empty",
            "aten::cat",
            "aten::clone",
            "aten::contiguous",
        ),
    ),
)


def profile_breakdown(fn, label: str) -> None:
    """Run `fn` once under torch.profiler and print its time per bin, with the top ops of the largest bins."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    totals: dict[str, float] = {}
    top: dict[str, dict[str, float]] = {}
    for e in events:
        if e.self_cpu_time_total <= 0 or not e.name.startswith("aten::"):
            continue
        parent, in_opt = e.cpu_parent, False
        while parent is not None:
            if parent.name.startswith("Optimizer.step"):
                in_opt = True
                break
            parent = parent.cpu_parent
        if in_opt:
            bin_ = "optimizer"
        else:
            bin_ = next((b for b, keys in BINS if any(k in e.name for k in keys)), "elementwise/other")
        totals[bin_] = totals.get(bin_, 0.0) + e.self_cpu_time_total
        top.setdefault(bin_, {})
        top[bin_][e.name] = top[bin_].get(e.name, 0.0) + e.self_cpu_time_total
    whole = sum(totals.values())
    print(f"profile: {label}: {whole / 1e3:.0f} ms of aten self time")
    for bin_, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        ops = sorted(top[bin_].items(), key=lambda kv: -kv[1])[:3]
        names = ", ".join(f"{n.removeprefix('aten::')} {t / 1e3:.0f}" for n, t in ops)
        print(f"  {bin_:<18}{us / 1e3:>8.0f} ms {100 * us / whole:>5.1f}%   ({names})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--profile", action="store_true", help="print a profiler breakdown of each step")
    args = parser.parse_args()
    import transformers

    device, rounds = args.device, (2 if args.quick else 5)
    # deepsail's trainer keeps freed host memory in glibc's heap (train/allocator.py); the setting is per process,
    # so HF's side, in this same process, gets it too: the comparison is of model code alone.
    allocator = "glibc heap kept (as deepsail's trainer does)" if device == "cpu" and keep_freed_memory() else "default"
    torch.manual_seed(0)
    config = ModelConfig.preset("deepseek-v3-small").replace(num_nextn_predict_layers=0)
    ours = ds.Transformer(config).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
    hf = hf.to(device)
    print(
        f"device={device} torch={torch.__version__} transformers={transformers.__version__} threads="
        f"{torch.get_num_threads()} allocator={allocator}"
    )
    print(f"cpu: {cpu_name()}, {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"model: {ours.num_params() / 1e6:.1f}M params, {ours.num_params(active=True) / 1e6:.1f}M active")

    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), device=device)
    with torch.no_grad():  # same weights -> same logits: a benchmark of the same function
        diff = (ours(ids[:2, :64]).logits - hf(ids[:2, :64]).logits).abs().max().item()
    print(f"parity check: max |Δlogit| = {diff:.2e}\n")
    rows = []
    # Decode first: training steps below move the two copies apart (different optimizer numerics).
    ours.eval(), hf.eval()
    new = 64
    compiled = CompiledDecode(ours)
    for batch in (1, 8):
        prompt = torch.randint(0, config.vocab_size, (batch, 32), device=device)
        # random weights give near-flat logits, where a 1e-6 difference can flip a near-tie: count rows
        same = int((ds_greedy(ours, prompt, 16) == hf_greedy(hf, prompt, 16)).all(1).sum())
        t0 = time.perf_counter()
        compiled_same = bool((ds_greedy(ours, prompt, 16, compiled) == ds_greedy(ours, prompt, 16)).all())
        first = time.perf_counter() - t0
        t = alternate(
            {
                "deepsail": lambda p=prompt: ds_greedy(ours, p, new),
                "compiled": lambda p=prompt: ds_greedy(ours, p, new, compiled),
                "hf": lambda p=prompt: hf_greedy(hf, p, new),
            },
            rounds,
            device,
        )
        if args.profile:
            profile_breakdown(lambda p=prompt: ds_greedy(ours, p, 16), f"deepsail eager decode b{batch}, 16 tokens")
            profile_breakdown(lambda p=prompt: hf_greedy(hf, p, 16), f"HF decode b{batch}, 16 tokens")
        rows.append(
            (
                f"decode fp32 batch {batch} tok/s",
                batch * new / t["deepsail"],
                batch * new / t["hf"],
                f"  rows with 16 greedy tokens identical to HF: {same}/{batch}",
            )
        )
        rows.append(
            (
                f"  compiled decode b{batch} tok/s",
                batch * new / t["compiled"],
                batch * new / t["hf"],
                f"  (infer/graphs.py; greedy identical to eager: {compiled_same}; first call incl. compile "
                f"{first:.0f} s)",
            )
        )

    # bf16 weights, batch 1: half the bytes per token, so twice the roofline. Greedy tokens are not compared with
    # eager: bf16 rounds differently in fused kernels, and random weights give near-ties.
    ours16, hf16 = copy.deepcopy(ours).to(torch.bfloat16), copy.deepcopy(hf).to(torch.bfloat16)
    compiled16 = CompiledDecode(ours16)
    prompt = torch.randint(0, config.vocab_size, (1, 32), device=device)
    t0 = time.perf_counter()
    ds_greedy(ours16, prompt, 16, compiled16)
    first = time.perf_counter() - t0
    t = alternate(
        {
            "deepsail": lambda: ds_greedy(ours16, prompt, new),
            "compiled": lambda: ds_greedy(ours16, prompt, new, compiled16),
            "hf": lambda: hf_greedy(hf16, prompt, new),
        },
        rounds,
        device,
    )
    rows.append(("decode bf16 batch 1 tok/s", new / t["deepsail"], new / t["hf"], ""))
    rows.append(
        (
            "  compiled decode bf16 b1 tok/s",
            new / t["compiled"],
            new / t["hf"],
            f"  (first call incl. compile {first:.0f} s)",
        )
    )

    tokens = args.batch * args.seq
    flops_tok = ours.flops_per_token(args.seq)
    for precision in ("fp32", "bf16"):
        peak, source = peak_flops(torch.device(device), precision)
        t = alternate(
            {
                "deepsail": train_step_fn(ours.train(), False, ids, precision, device),
                "hf": train_step_fn(hf.train(), True, ids, precision, device),
            },
            rounds,
            device,
        )
        ours_tps, hf_tps = tokens / t["deepsail"], tokens / t["hf"]
        if args.profile:
            profile_breakdown(train_step_fn(ours.train(), False, ids, precision, device), f"deepsail train {precision}")
            profile_breakdown(train_step_fn(hf.train(), True, ids, precision, device), f"HF train {precision}")
        mfu = f"  MFU {100 * ours_tps * flops_tok / peak:.1f}% of {peak / 1e12:.2f} TFLOP/s ({source.split(',')[0]})"
        rows.append((f"train {precision} {args.batch}x{args.seq} tok/s", ours_tps, hf_tps, mfu))
    # Batch-1 decode reads every active weight once per token (the embedding only one row): the roofline.
    weight_bytes = (ours.num_params(active=True) - ours.embed_tokens.weight.numel()) * 4
    bandwidth = copy_bandwidth(device)
    gemv = gemv_limit(ours, device)
    print(
        f"batch-1 decode limits: {weight_bytes / 1e6:.0f} MB of fp32 weights per token\n"
        f"  memory roofline: / {bandwidth / 1e9:.1f} GB/s copy bandwidth = {bandwidth / weight_bytes:.0f} tok/s"
    )
    for route, t in gemv.items():
        print(
            f"  GEMV ({route + '):':<10} the step's matrix-vector products alone take {t * 1e3:.2f} ms "
            f"({weight_bytes / t / 1e9:.1f} GB/s) = {1 / t:.0f} tok/s"
        )
    print()
    print(f"{'measure':<32}{'deepsail':>12}{'HF':>12}{'ratio':>9}")
    for name, a, b, note in rows:
        if name.startswith("decode fp32 batch 1") or name.startswith("  compiled decode b1"):
            note += (
                f"  (deepsail at {a * gemv['deepsail']:.0%} of its GEMV limit and {a * weight_bytes / bandwidth:.0%} "
                f"of the memory roofline, HF at {b * gemv['F.linear']:.0%})"
            )
        if "bf16 b" in name or "bf16 batch 1" in name:
            roof16 = 2 * bandwidth / weight_bytes
            note += f"  ({a / roof16:.0%} of the bf16 roofline, {roof16:.0f} tok/s)"
        print(f"{name:<32}{a:>12.0f}{b:>12.0f}{a / b:>8.2f}x{note}")


if __name__ == "__main__":
    main()
