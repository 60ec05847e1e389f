"""Long context: dense attention vs hybrid sparse attention (`--arch sparse_attention=hybrid`, NSA-style), same model.

    python benchmarks/long_context.py                      # 1k/4k/16k prefill + decode, then the quality runs
    python benchmarks/long_context.py --skip-quality       # timings only (~5 min on 2 busy cores)
    python benchmarks/long_context.py --gpu                # on CUDA, + 64k
    python benchmarks/long_context.py --skip-quality --bf16 --lengths 16384   # CPU timings in bf16
    python benchmarks/long_context.py --skip-quality --lengths 16384 --preset deepseek-v3-small   # a wider model

Timing: one model config (by default deepseek-v3-mini-dense's width: MLA, 4 heads, hidden 256, dense MLP; another
with `--preset`), built twice with the same seed, once with each attention. Per length, the two sides alternate
`--repeats` times; each repeat is a prefill through the paged cache (as the engine runs it: last-token logits
only), `--decode-steps` 1-token eager decode steps after it, then as many through the compiled decode step
(`infer/graphs.py`, what `--compile` runs; compiled once per side before the timed runs, `--no-compile` skips it).
Medians are printed, with the share of each forward spent inside the attention modules (forward hooks) so the
whole-model ratio can be read against what attention alone gained, and the load average.
The "bound" column is the physical limit for the hybrid's design: its attention FLOPs (`attention_flops`, counted
as the code runs them) at the FLOP rate the fused dense kernel reached in the same run, plus its own other work.

Quality: the same preset trained from the same seed on the same batches of the embedded corpus (documents packed
into `--seq-len`-token windows) for `--steps` steps each, then val bits/byte over the whole validation split.

The table goes to stdout and --out/long_context.md, time vs length (log-log) to --out/long_context.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HYBRID = ("sparse_attention=hybrid",)


def build(arch: tuple[str, ...], max_len: int, device: str, dtype, preset: str = "deepseek-v3-mini-dense"):
    import torch

    from deepsail.model import ModelConfig, Transformer

    cfg = ModelConfig.preset(preset).with_overrides(arch)
    cfg = cfg.replace(max_position_embeddings=max(max_len, cfg.max_position_embeddings), num_nextn_predict_layers=0)
    torch.manual_seed(0)
    return Transformer(cfg).to(device=device, dtype=dtype).eval()


class AttentionClock:
    """Seconds spent inside the attention modules (forward hooks; CUDA-synchronised on a GPU)."""

    def __init__(self, model, sync) -> None:
        import torch

        self.compiling = torch.compiler.is_compiling
        self.total, self._t0, self.sync = 0.0, 0.0, sync
        for block in model.layers:
            block.self_attn.register_forward_pre_hook(self._start)
            block.self_attn.register_forward_hook(self._stop)

    def _start(self, *_):
        if self.compiling():  # the compiled decode step traces the hooks: leave them out of its graph
            return
        self.sync()
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        if self.compiling():
            return
        self.sync()
        self.total += time.perf_counter() - self._t0


def attention_flops(cfg, T: int, hybrid: bool) -> float:
    """Multiply-add FLOPs (x2) of one layer's attention products in a T-token prefill, as this code runs them.

    Dense prefill takes MLA's expanded path: per head, q.k over qk_nope + qk_rope dims and p.v over the values
    zero-padded to that width (attention.py). The hybrid takes the absorbed path: every head reads the latent
    (kv_lora_rank + rope dims); the window branch passes the whole latent row as value, the other two its first
    kv_lora_rank columns. Key counts per query follow sparse_attention.py exactly (sinks included)."""
    import torch

    H, r, rope = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    p = torch.arange(T, dtype=torch.float64)  # query positions
    if not hybrid:
        d = cfg.qk_nope_head_dim + rope
        return float((p + 1).sum()) * H * 2 * (d + d)
    W, c, S, K = cfg.sliding_window, cfg.compress_block, cfg.select_block, cfg.select_top_k
    window = torch.clamp(p + 1, max=W)
    compressed = torch.floor((p + 1) / c) + 1
    # selectable: blocks j that start at or before p - W and are complete, j*S <= p - W and (j+1)*S <= p + 1
    candidates = torch.minimum(torch.floor((p - W) / S) + 1, torch.floor((p + 1) / S)).clamp(min=0)
    selected = torch.clamp(candidates, max=K) * S
    dk = r + rope
    return float(H * 2 * (window.sum() * (dk + dk) + (compressed.sum() + selected.sum()) * (dk + r)))


def time_one(model, clock, length: int, decode_steps: int, sync, compiled=None) -> dict:
    import torch

    device = model.embed_tokens.weight.device
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    ids = ids.to(device)
    cache = model.new_cache(1, length + 2 * decode_steps, block_size=64)
    with torch.no_grad():
        clock.total = 0.0
        sync()
        t0 = time.perf_counter()
        logits = model(ids, cache=cache, last_logits_only=True).logits
        sync()
        prefill, attn = time.perf_counter() - t0, clock.total
        tok = logits[:, -1].argmax(-1, keepdim=True)
        steps = []
        for _ in range(decode_steps):
            t0 = time.perf_counter()
            tok = model(tok, cache=cache, last_logits_only=True).logits[:, -1].argmax(-1, keepdim=True)
            sync()
            steps.append(time.perf_counter() - t0)
        fast = []
        for _ in range(decode_steps if compiled is not None else 0):
            t0 = time.perf_counter()
            tok = compiled(tok, cache).argmax(-1, keepdim=True)
            sync()
            fast.append(time.perf_counter() - t0)
    compiled_s = statistics.median(fast) if fast else float("nan")
    return dict(prefill=prefill, attn_share=attn / prefill, decode=statistics.median(steps), compiled=compiled_s)


def timings(a, device: str, dtype) -> list[dict]:
    import torch

    from deepsail.infer.graphs import CompiledDecode

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    lengths = a.lengths + ([65536] if a.gpu and 65536 not in a.lengths else [])
    n = max(lengths) + 2 * a.decode_steps
    models = {name: build(arch, n, device, dtype, a.preset) for name, arch in SIDES.items()}
    clocks = {name: AttentionClock(m, sync) for name, m in models.items()}
    compiled = {name: None if a.no_compile else CompiledDecode(m) for name, m in models.items()}
    for name, m in models.items():  # the compile itself, untimed (hybrid: ~27 s on 2 cores, dense ~14 s)
        if compiled[name] is not None:
            time_one(m, clocks[name], 1024, 2, sync, compiled[name])
    rows = []
    for length in lengths:
        runs = {name: [] for name in models}
        load = os.getloadavg()[0]
        time_one(models["hybrid"], clocks["hybrid"], min(length, 1024), 2, sync)  # warm-up, untimed
        time_one(models["dense"], clocks["dense"], min(length, 1024), 2, sync)
        for _ in range(a.repeats):
            for name in models:  # alternate: a load spike hits both sides alike
                runs[name].append(time_one(models[name], clocks[name], length, a.decode_steps, sync, compiled[name]))
        row = dict(length=length, load=(load + os.getloadavg()[0]) / 2)
        for name, rs in runs.items():
            for key in ("prefill", "attn_share", "decode", "compiled"):
                row[f"{name}_{key}"] = statistics.median(r[key] for r in rs)
        # The bound: the hybrid's attention FLOPs run at the FLOP rate the dense kernel reached in this run (its own
        # non-attention time kept). No kernel for these products can beat it by much on this machine.
        n_layers = len(models["dense"].layers)
        dense_rate = attention_flops(models["dense"].config, length, False) * n_layers
        dense_rate /= row["dense_prefill"] * row["dense_attn_share"]
        hybrid_attn_s = attention_flops(models["hybrid"].config, length, True) * n_layers / dense_rate
        row["dense_gflops"] = dense_rate / 1e9
        row["bound"] = row["dense_prefill"] / (row["hybrid_prefill"] * (1 - row["hybrid_attn_share"]) + hybrid_attn_s)
        rows.append(row)
        print(
            f"{length:>6} tokens: prefill dense {row['dense_prefill']:.3f}s hybrid {row['hybrid_prefill']:.3f}s "
            f"({row['dense_prefill'] / row['hybrid_prefill']:.2f}x) | decode dense {1e3 * row['dense_decode']:.1f} "
            f"hybrid {1e3 * row['hybrid_decode']:.1f} ms/token, compiled {1e3 * row['dense_compiled']:.1f} / "
            f"{1e3 * row['hybrid_compiled']:.1f} | dense attention {row['dense_gflops']:.0f} GFLOP/s, "
            f"hybrid bound at that rate {row['bound']:.2f}x | load {row['load']:.1f}",
            flush=True,
        )
    return rows


SIDES = {"dense": (), "hybrid": HYBRID}


def quality(a) -> dict[str, dict]:
    from rich.console import Console

    from deepsail.data.corpus import default_corpus
    from deepsail.data.loader import read_manifest
    from deepsail.data.prepare import prepare
    from deepsail.data.tokenizer import Tokenizer
    from deepsail.train.config import TrainConfig
    from deepsail.train.pretrain import pretrain

    data = a.data_cache / "data"
    if not (data / "manifest.json").is_file():  # the same tokenizer + shards as benchmarks/ablations.py's
        Tokenizer.train([d.text for d in default_corpus("train")], vocab_size=4096).save(a.data_cache / "tokenizer")
        prepare(None, a.data_cache / "tokenizer", data, progress=False)
    val_windows = read_manifest(data)["splits"]["val"]["tokens"] // (a.seq_len + 1)
    base = TrainConfig(
        data=str(data),
        tokenizer=str(a.data_cache / "tokenizer"),
        model_preset="deepseek-v3-mini-dense",
        steps=a.steps,
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=min(30, a.steps // 5),
        eval_every=0,
        eval_batches=max(1, -(-val_windows // a.batch_size)),
        log_every=max(1, a.steps // 5),
        ckpt_every=0,
        keep_last=1,
        seed=0,
    )
    out = {}
    for name, arch in SIDES.items():
        t0 = time.time()
        arch = (*arch, f"max_position_embeddings={max(1024, a.seq_len)}")
        result = pretrain(base.replace(arch=arch, out=str(a.out / f"train-{name}")), console=Console(quiet=True))
        out[name] = dict(bpb=result.val["bpb"], tok_s=result.tok_per_s, minutes=(time.time() - t0) / 60)
        print(
            f"{name}: val bpb {out[name]['bpb']:.4f} after {a.steps} steps of {a.batch_size}x{a.seq_len} | "
            f"{out[name]['tok_s']:,.0f} tok/s | {out[name]['minutes']:.1f} min | load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    return out


def write(rows: list[dict], qual: dict[str, dict], a, header: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepsail.files import atomic_path, atomic_write_text

    lines = [
        header,
        "",
        "| tokens | prefill dense | prefill hybrid | speedup | bound | attention share dense / hybrid | decode dense | "
        "decode hybrid | speedup | compiled decode dense | compiled decode hybrid | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']:,} | {r['dense_prefill']:.3f} s | {r['hybrid_prefill']:.3f} s | "
            f"{r['dense_prefill'] / r['hybrid_prefill']:.2f}x | {r['bound']:.2f}x | {r['dense_attn_share']:.0%} / "
            f"{r['hybrid_attn_share']:.0%} | {1e3 * r['dense_decode']:.1f} ms | {1e3 * r['hybrid_decode']:.1f} ms | "
            f"{r['dense_decode'] / r['hybrid_decode']:.2f}x | {1e3 * r['dense_compiled']:.1f} ms | "
            f"{1e3 * r['hybrid_compiled']:.1f} ms | {r['dense_compiled'] / r['hybrid_compiled']:.2f}x |"
        )
    if qual:
        lines += [
            "",
            f"Quality after {a.steps} steps of {a.batch_size}x{a.seq_len} tokens (embedded corpus, same seed):",
        ]
        lines += ["", "| attention | val bpb | train tok/s |", "|---|---|---|"]
        lines += [f"| {n} | {q['bpb']:.4f} | {q['tok_s']:,.0f} |" for n, q in qual.items()]
    text = "\n".join(lines)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out / "long_context.md", text + "\n")
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [r["length"] for r in rows]
    for ax, key, label in ((axes[0], "prefill", "prefill (s)"), (axes[1], "decode", "decode (s/token)")):
        for name, color in (("dense", "C0"), ("hybrid", "C1")):
            ax.loglog(x, [r[f"{name}_{key}"] for r in rows], "o-", color=color, label=name, base=2)
            if key == "decode" and not a.no_compile:
                y = [r[f"{name}_compiled"] for r in rows]
                ax.loglog(x, y, "s--", color=color, label=f"{name} compiled", base=2)
        ax.set(xlabel="context tokens", ylabel=label)
        ax.grid(True, which="both", lw=0.3)
        ax.legend()
    fig.suptitle(f"Dense vs hybrid sparse attention ({a.preset} width)")
    fig.tight_layout()
    with atomic_path(a.out / "long_context.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--gpu", action="store_true", help="run on CUDA in bf16 and add 64k")
    p.add_argument("--bf16", action="store_true", help="time in bf16 on CPU too (AMX / AVX512-BF16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the free cores)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled decode timings")
    p.add_argument("--preset", default="deepseek-v3-mini-dense", help="the model timed (quality: always mini-dense)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--steps", type=int, default=150, help="training steps per side for the quality comparison")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/long_context"))
    p.add_argument("--data-cache", type=Path, default=Path("runs/ablations-data"))
    a = p.parse_args()

    import torch

    from deepsail.threads import use_free_cores
    from deepsail.train.allocator import keep_freed_memory

    keep_freed_memory()
    if a.threads:
        torch.set_num_threads(a.threads)
    else:
        use_free_cores()
    device = "cuda" if a.gpu else "cpu"
    dtype = torch.bfloat16 if a.gpu or a.bf16 else torch.float32
    header = (
        f"{device} ({torch.cuda.get_device_name() if a.gpu else f'{os.cpu_count()} cores'}), "
        f"{torch.get_num_threads()} threads, {dtype}, torch {torch.__version__} | load {os.getloadavg()} | "
        f"{a.preset} | hybrid: "
        "window 256, compressed blocks of 32, top-4 selected blocks of 64"
    )
    print(header, flush=True)
    rows = [] if a.skip_timing else timings(a, device, dtype)
    qual = {} if a.skip_quality else quality(a)
    write(rows, qual, a, header)


if __name__ == "__main__":
    main()
