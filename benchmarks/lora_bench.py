"""A LoRA fine-tuning step: deepsail's `apply_lora` beside peft + transformers on the same base weights, taking turns.

    python benchmarks/lora_bench.py                          # both bases, fp32, batch 4x256, 3 rounds
    python benchmarks/lora_bench.py --precision bf16         # bf16 autocast on both sides
    python benchmarks/lora_bench.py --precision bf16 --base-dtype bf16   # + the frozen base stored in bf16
    python benchmarks/lora_bench.py --precision bf16 --compile --base llama --rounds 1   # torch.compile, both sides
    python benchmarks/lora_bench.py --base llama --steps 2 --rounds 1 --batch 2 --seq 64   # smoke test
    python benchmarks/lora_bench.py --profile                # + the top ops of one step, each side, first round

Goal (from the issue): deepsail >= 1.5x peft's tokens/s at <= peft's peak memory.

Bases (random weights, written once by deepsail's `save_pretrained` in HF format, then read by each side's own
loader: `deepsail.from_pretrained` and `transformers.AutoModelForCausalLM.from_pretrained(dtype=fp32)`):
- `deepseek-v3-small` (MTP off: transformers' DeepseekV3 has none, and both sides must compute the same function);
- `llama`: a Llama-shaped model of the same width and depth (hidden 512, 8 layers, 8 heads, 2 KV heads, SwiGLU
  1408, vocab 8192), ~31M parameters.

Adapter, the same on both sides: r=16, alpha=32, dropout 0.1 (the design's recommendation) on
- MLA's q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj: attention only, because peft (0.18+ with
  transformers 5) maps gate_proj/up_proj/down_proj targets on a MoE model onto the routed experts' fused weights
  and drops the dense and shared-expert MLP adapters, so the two sides would not adapt the same layers;
- Llama's q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.

A step: forward on [batch, seq] random token ids with the loss on the same batch·seq next tokens on both sides
(ids is [batch, seq + 1]; deepsail: model(ids[:, :-1], labels=ids[:, 1:]), deepsail does not shift; HF:
model(input_ids=ids[:, :-1], labels=y, shift_labels=y, use_cache=False) with y = ids[:, 1:], so HF's own loss
code runs without its internal shift), backward, AdamW (fused, lr 1e-4) over the adapter weights, zero_grad.
fp32 by default; `--precision bf16` wraps the forward and loss in torch.autocast("cpu", bfloat16) on both sides.

Each (base, side, round) runs in a fresh subprocess, so memory is per side: RSS after the model is loaded and
adapted, the peak RSS during the timed steps (VmHWM, reset after loading through /proc/self/clear_refs) and the
increment between them; also the lifetime peak (imports and loading included). Rounds alternate the order of the
two sides, so drift in machine load hits both alike. A run's tok/s is batch·seq / its median step time; the table
gives the median over rounds (min-max beside it). Each run also reports how many cores other processes kept busy
while it was timed (/proc/stat minus its own CPU time): on a small shared machine a run beside a busy neighbour is
several times slower, and the summary says when that happened. Even on a quiet machine two processes running the
same code can differ by 10-20% on a small VM (seen on 2 shared Zen 4 cores): more rounds narrow the median.
Both sides run under the same allocator: by default glibc told to keep freed memory, as deepsail's trainer does
on CPU (train/allocator.py); `--allocator default` leaves glibc as it is on both.

The physical limit: with the base frozen a token costs ~4·N FLOPs (forward 2N, backward activation gradients 2N,
no weight gradients), N = active non-embedding parameters, plus attention's forward and backward (3x its forward)
and the adapters' 6 FLOPs per parameter. At the measured matmul peak of this machine that is the roofline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepsail.train.metrics import cpu_name

SIDES = ("deepsail", "peft")
MLA_TARGETS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA, LR = 16, 32.0, 1e-4


@dataclass(frozen=True)
class Base:
    name: str
    targets: tuple[str, ...]
    note: str


BASES = {
    "deepseek-v3-small": Base(
        "deepseek-v3-small",
        MLA_TARGETS,
        "attention targets only: on MoE bases peft maps gate/up/down_proj onto the routed experts' fused weights "
        "and drops the dense/shared MLP adapters",
    ),
    "llama": Base("llama", LLAMA_TARGETS, "attention + MLP targets"),
}


def model_config(base: str) -> Any:
    from deepsail.model import ModelConfig

    if base == "deepseek-v3-small":
        return ModelConfig.preset("deepseek-v3-small").replace(num_nextn_predict_layers=0)
    return ModelConfig(
        model_type="llama",
        attention_type="gqa",
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_interleave=False,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=2048,
    )


# --- machine ---------------------------------------------------------------------------------------------------------


def proc_status_mb(key: str) -> float:
    """A /proc/self/status memory line (VmRSS: now, VmHWM: peak since start or the last reset), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(key)


def cpu_busy_s() -> float:
    """CPU seconds all processes have spent busy (not idle, not waiting on I/O) since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # user..steal minus idle, iowait


def reset_peak_rss() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0), so the peak that follows is the step's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --- the child: one side, one base, one round ------------------------------------------------------------------------
def load_side(
    side: str, model_dir: str, targets: tuple[str, ...], dropout: float, base_dtype: str = "fp32"
) -> torch.nn.Module:
    """The base in `base_dtype` (frozen), fp32 adapters on it: deepsail's and peft's defaults alike."""
    dtype = torch.bfloat16 if base_dtype == "bf16" else torch.float32
    if side == "deepsail":
        import deepsail as ds
        from deepsail.tune.lora import LoraConfig, apply_lora

        model = ds.from_pretrained(model_dir, dtype=dtype)
        apply_lora(model, LoraConfig(r=R, alpha=ALPHA, dropout=dropout, targets=targets))
        return model
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    lora = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=list(targets))
    return peft.get_peft_model(hf, lora)


def loss_of(side: str, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over the same batch·seq targets on both sides (see the module docstring)."""
    x, y = ids[:, :-1], ids[:, 1:].contiguous()
    if side == "deepsail":
        return model(x, labels=y).loss
    return model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss


def top_ops(step: Any, rows: int = 14) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


def child(args: argparse.Namespace) -> None:
    if args.allocator == "keep":
        from deepsail.train.allocator import keep_freed_memory

        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_side(args.child, args.model_dir, tuple(args.targets.split(",")), args.dropout, args.base_dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Measured with every weight resident (a loader may map the checkpoint file and page it in on first use) but
    # before any forward: with glibc keeping freed memory, a forward's buffers would stay in the RSS.
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    loaded_mb = proc_status_mb("VmRSS")
    # VmHWM, not ru_maxrss: Linux folds the RSS of the forked parent (before exec) into a child's ru_maxrss.
    load_peak_mb = proc_status_mb("VmHWM")
    peak_reset = reset_peak_rss()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(args.seed))
    amp: AbstractContextManager = (
        torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    )
    model.eval()  # the same function on both sides: loss without dropout, before any update
    with torch.no_grad(), amp:
        eval_loss = loss_of(args.child, model, ids).item()
    model.train()
    # --compile: torch.compile on both sides, the compile itself inside the (unmeasured) warm-up steps
    train_model = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(trainable, lr=LR, fused=True)

    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "step": []}

    def step(record: bool = False) -> None:
        t0 = time.perf_counter()
        with amp:
            loss = loss_of(args.child, train_model, ids)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if record:
            t3 = time.perf_counter()
            for name, t in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                phases[name].append(t)

    for _ in range(args.warmup):
        step()
    busy0, cpu0, wall0 = cpu_busy_s(), time.process_time(), time.perf_counter()
    for _ in range(args.steps):
        step(record=True)
    others = (cpu_busy_s() - busy0 - (time.process_time() - cpu0)) / (time.perf_counter() - wall0)
    train_peak_mb = proc_status_mb("VmHWM")
    result = dict(
        tok_s=args.batch * args.seq / statistics.median(phases["step"]),  # the median step: robust to a burst
        phases_ms={k: 1e3 * statistics.median(v) for k, v in phases.items()},
        others=max(0.0, others),
        loaded_mb=loaded_mb,
        train_peak_mb=train_peak_mb,
        lifetime_peak_mb=max(load_peak_mb, train_peak_mb),
        peak_reset=peak_reset,
        eval_loss=eval_loss,
        trainable=sum(p.numel() for p in trainable),
        threads=torch.get_num_threads(),
        profile=top_ops(step) if args.profile else None,
    )
    print("RESULT " + json.dumps(result))


# --- the parent ------------------------------------------------------------------------------------------------------
def write_base(base: str, folder: Path, seed: int) -> dict[str, float]:
    """Random weights for `base` in HF format in `folder`; the parameter counts `lora_flops_per_token` needs."""
    from deepsail.model import Transformer
    from deepsail.tune.lora import LoraConfig, apply_lora

    torch.manual_seed(seed)
    model = Transformer(model_config(base))
    model.save_pretrained(folder)
    c = model.config
    n = model.num_params(active=True) - model.embed_tokens.weight.numel()
    apply_lora(model, LoraConfig(r=R, alpha=ALPHA, targets=BASES[base].targets))
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    qk, v = (c.qk_head_dim, c.v_head_dim) if c.attention_type == "mla" else (c.head_dim, c.head_dim)
    return dict(
        params=model.num_params() - n_lora,
        active=n + model.embed_tokens.weight.numel(),
        n=n,
        n_lora=n_lora,
        attention_per_seq=c.num_hidden_layers * c.num_attention_heads * (qk + v),  # x seq: forward FLOPs per token
        vocab=c.vocab_size,
    )


def lora_flops_per_token(info: dict[str, float], seq: int) -> float:
    """Frozen base: 2N forward + 2N activation gradients; attention 3x its forward; adapters 6 per parameter."""
    return 4 * info["n"] + 3 * info["attention_per_seq"] * seq + 6 * info["n_lora"]


def run_child(args: argparse.Namespace, side: str, base: str, folder: Path, vocab: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--model-dir",
        str(folder),
        "--targets",
        ",".join(BASES[base].targets),
        "--vocab",
        str(vocab),
        *("--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)),
        *("--warmup", str(args.warmup), "--precision", args.precision, "--allocator", args.allocator),
        *("--base-dtype", args.base_dtype),
        *(["--compile"] if args.compile else []),
        *("--seed", str(args.seed), "--threads", str(args.threads), "--dropout", str(args.dropout)),
        *(["--profile"] if args.profile else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{side} on {base} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", choices=[*BASES, "all"], default="all")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--base-dtype", choices=("fp32", "bf16"), default="fp32", help="the frozen base's weights, both sides"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per round and side")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps before them")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout, both sides (0.1: the design's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each side (0: torch's default)")
    parser.add_argument("--allocator", choices=("keep", "default"), default="keep", help="glibc setting, both sides")
    parser.add_argument("--profile", action="store_true", help="top ops of one step per side (first round)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step, both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--targets", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import peft
    import transformers

    from deepsail.train.metrics import peak_flops

    bases = list(BASES) if args.base == "all" else [args.base]
    threads = args.threads or torch.get_num_threads()
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {threads}, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min)"
    )
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    print(
        f"step: batch {args.batch}x{args.seq}, {args.precision} (base weights {args.base_dtype}), "
        f"LoRA r={R} alpha={ALPHA:g} dropout {args.dropout:g}, "
        f"AdamW lr {LR:g}; {args.warmup} warm-up + {args.steps} measured steps per run, {args.rounds} rounds; "
        f"allocator: {'glibc keeps freed memory (deepsail trainer setting)' if args.allocator == 'keep' else 'default'}"
        " on both sides"
    )
    peak, source = peak_flops(torch.device("cpu"), args.precision)
    print(f"matmul peak {args.precision}: {peak / 1e12:.3f} TFLOP/s ({source.split(',')[0]})\n")

    results: dict[tuple[str, str], list[dict[str, Any]]] = {(b, s): [] for b in bases for s in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        infos = {b: write_base(b, Path(tmp) / b, args.seed) for b in bases}
        for b in bases:
            i = infos[b]
            print(
                f"{b}: {i['params'] / 1e6:.1f}M params ({i['active'] / 1e6:.1f}M active), "
                f"{i['n_lora'] / 1e6:.2f}M adapter params; {BASES[b].note}"
            )
        print()
        for r in range(args.rounds):
            order = SIDES if r % 2 == 0 else SIDES[::-1]
            for b in bases:
                for side in order:
                    res = run_child(args, side, b, Path(tmp) / b, infos[b]["vocab"])
                    results[(b, side)].append(res)
                    ph = res["phases_ms"]
                    print(
                        f"round {r + 1} {b:<18} {side:<9} {res['tok_s']:7.0f} tok/s  fwd {ph['forward']:6.0f} "
                        f"bwd {ph['backward']:6.0f} opt {ph['optimizer']:4.0f} ms  loaded {res['loaded_mb']:5.0f} MB "
                        f"train peak {res['train_peak_mb']:5.0f} MB  (other processes: {res['others']:.2f} cores)",
                        flush=True,
                    )
                    if res["profile"] and r == 0:
                        print(f"--- {b} {side}: one step, top ops by self CPU time\n{res['profile']}")

    print(
        f"\n{'base':<18} {'side':<9} {'tok/s median (min-max)':>23} {'loaded MB':>10} {'train peak MB':>14} "
        f"{'+train MB':>10} {'lifetime peak':>14} {'roofline':>9}"
    )
    verdicts = []
    for b in bases:
        flops = lora_flops_per_token(infos[b], args.seq)
        roof = peak / flops
        med: dict[str, dict[str, float]] = {}
        for side in SIDES:
            rs = results[(b, side)]
            tps = [x["tok_s"] for x in rs]
            m = {k: statistics.median(x[k] for x in rs) for k in ("loaded_mb", "train_peak_mb", "lifetime_peak_mb")}
            m["tok_s"] = statistics.median(tps)
            m["inc"] = m["train_peak_mb"] - m["loaded_mb"]
            med[side] = m
            print(
                f"{b:<18} {side:<9} {spread(tps):>23} {m['loaded_mb']:>10.0f} {m['train_peak_mb']:>14.0f} "
                f"{m['inc']:>10.0f} {m['lifetime_peak_mb']:>14.0f} {m['tok_s'] / roof:>8.1%}"
            )
        d, p = med["deepsail"], med["peft"]
        speed, mem = d["tok_s"] / p["tok_s"], d["train_peak_mb"] / p["train_peak_mb"]
        print(
            f"{b:<18} {'ratio':<9} {speed:>22.2f}x {d['loaded_mb'] / p['loaded_mb']:>9.2f}x {mem:>13.2f}x "
            f"{d['inc'] / p['inc']:>9.2f}x {d['lifetime_peak_mb'] / p['lifetime_peak_mb']:>13.2f}x"
        )
        losses = [statistics.median(x["eval_loss"] for x in results[(b, s)]) for s in SIDES]
        per_round = [
            x["tok_s"] / y["tok_s"] for x, y in zip(results[(b, "deepsail")], results[(b, "peft")], strict=True)
        ]
        print(
            f"{'':<18} tok/s ratio of the two runs of each round (run back to back): "
            + " ".join(f"{x:.2f}x" for x in per_round)
        )
        print(
            f"{'':<18} roofline: {flops / 1e6:.0f} MFLOP/token (4N + attention + adapters) at "
            f"{peak / 1e12:.3f} TFLOP/s = {roof:.0f} tok/s (the last column: each side's fraction of it)"
        )
        print(
            f"{'':<18} same function: eval loss before training, deepsail {losses[0]:.5f}, peft {losses[1]:.5f}; "
            f"trainable parameters {results[(b, 'deepsail')][0]['trainable']:,} vs "
            f"{results[(b, 'peft')][0]['trainable']:,}"
        )
        met = speed >= 1.5 and mem <= 1.0
        verdicts.append(f"{b}: {'met' if met else 'NOT met'} ({speed:.2f}x tok/s, {mem:.2f}x train peak RSS)")
    busy = [(b, s, x["others"]) for (b, s), rs in results.items() for x in rs if x["others"] > 0.25]
    if busy:
        print(
            f"note: {len(busy)} of {sum(map(len, results.values()))} runs had other processes busy on > 0.25 cores "
            f"(most: {max(o for *_, o in busy):.2f}): their tok/s is low and the ratios are less reliable"
        )
    if not all(x["peak_reset"] for rs in results.values() for x in rs):
        print("note: /proc/self/clear_refs was not writable: 'train peak' includes loading")
    print(f"\ngoal (deepsail >= 1.5x peft tok/s at <= its peak RSS), {args.precision}: " + "; ".join(verdicts))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
