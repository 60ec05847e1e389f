"""Every architecture option against the baseline at equal wall clock: val bits/byte, tok/s, parameters.

    python benchmarks/ablations.py                        # 4 min per variant on deepseek-v3-mini, embedded corpus
    python benchmarks/ablations.py --minutes 1 --variants baseline,gate-headwise      # a quick look

Each variant is one `pretrain` run of the same preset, data, batch, learning rate and seed for the same minutes;
only the option differs (`--arch`, a trainer flag, or a pipeline). Val bpb is over the whole validation split.

- baseline          deepseek-v3-mini as `deepsail run` trains it (MLA + DeepSeekMoE + MTP)
- gate-headwise     --arch attn_gate=headwise      (one sigmoid gate per head, Qiu et al. 2025)
- gate-elementwise  --arch attn_gate=elementwise   (one gate per output channel)
- dropout           --dropout 0.1 --dropout-end 0  (residual dropout, scheduled down)
- mod               --arch mod_capacity=0.5        (Mixture-of-Depths: half the tokens through every 2nd block)
- exit-loss         --arch exit_loss_weight=0.3    (LayerSkip's early-exit loss; see early_exit.py for the speed)
- memory            --arch segment_memory=256      (Transformer-XL: documents in order, 256 tokens of memory)
- hybrid            --arch sparse_attention=hybrid (NSA's three branches at their default sizes; in 256-token
                    windows the 256-key sliding window already sees everything and no block is selectable)
- hybrid-w64        the same at sizes where all three branches work within 256 tokens: a 64-key window,
                    16-token pooled blocks, the top 2 of the 32-token blocks (long_context.py: the long-text view)
- dense             deepseek-v3-mini-dense: every MLP as wide as a token's active experts (same active params)
- upcycled          the dense model for half the time, `deepsail upcycle` (8 experts, top-2, 1 shared), then
                    MoE for the other half: equal total wall clock with the MoE trained from scratch (baseline)

The table and ablations.png go to --out; the machine's load average is printed beside each run (a shared machine
skews wall-clock comparisons: run it alone).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "baseline": {},
    "gate-headwise": {"arch": ("attn_gate=headwise",)},
    "gate-elementwise": {"arch": ("attn_gate=elementwise",)},
    "dropout": {"dropout": 0.1, "dropout_end": 0.0},
    "mod": {"arch": ("mod_capacity=0.5",)},
    "exit-loss": {"arch": ("exit_loss_weight=0.3",)},
    "memory": {"arch": ("segment_memory=256",)},
    "hybrid": {"arch": ("sparse_attention=hybrid",)},
    "hybrid-w64": {
        "arch": (
            "sparse_attention=hybrid",
            "sliding_window=64",
            "compress_block=16",
            "select_block=32",
            "select_top_k=2",
        )
    },
    "dense": {"model_preset": "deepseek-v3-mini-dense"},
    "upcycled": "pipeline",
}


def prepare_data(folder: Path, vocab_size: int) -> Path:
    from deepsail.data.corpus import default_corpus
    from deepsail.data.prepare import prepare
    from deepsail.data.tokenizer import Tokenizer

    if not (folder / "data" / "manifest.json").is_file():
        tok = Tokenizer.train([d.text for d in default_corpus("train")], vocab_size=vocab_size)
        tok.save(folder / "tokenizer")
        prepare(None, folder / "tokenizer", folder / "data", progress=False)
    return folder / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=4.0, help="wall clock per variant")
    p.add_argument(
        "--steps", type=int, default=None, help="equal steps instead of equal minutes (fair on a shared machine)"
    )
    p.add_argument("--preset", default="deepseek-v3-mini")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path, default=Path("runs/ablations"))
    p.add_argument("--data-cache", type=Path, default=Path("runs/ablations-data"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0, help="init and data order; rerun with another to see the noise")
    a = p.parse_args()

    from rich.console import Console

    from deepsail.data.loader import read_manifest
    from deepsail.model import from_pretrained
    from deepsail.model.upcycle import upcycle
    from deepsail.train.config import TrainConfig
    from deepsail.train.pretrain import pretrain

    names = a.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    data = prepare_data(a.data_cache, 4096)
    val_windows = read_manifest(data)["splits"]["val"]["tokens"] // (a.seq_len + 1)
    base = TrainConfig(
        data=str(data),
        tokenizer=str(a.data_cache / "tokenizer"),
        model_preset=a.preset,
        steps=a.steps,
        minutes=None if a.steps else a.minutes,
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        lr=a.lr,
        min_lr=a.lr / 10,
        warmup_steps=30,
        eval_every=0,
        eval_batches=max(1, -(-val_windows // a.batch_size)),
        log_every=20,
        ckpt_every=0,
        keep_last=1,
        seed=a.seed,
    )
    if a.out.exists():
        shutil.rmtree(a.out)
    rows = []
    quiet = Console(quiet=True)
    budget = f"{a.steps} steps" if a.steps else f"{a.minutes:g} min"
    print(f"{os.cpu_count()} cores | {a.preset} | {budget} per variant | batch {a.batch_size}x{a.seq_len}")
    for name in names:
        load = os.getloadavg()[0]
        t0 = time.time()
        if VARIANTS[name] == "pipeline":
            half = base.replace(minutes=a.minutes / 2) if not a.steps else base.replace(steps=a.steps // 2)
            dense = pretrain(
                half.replace(model_preset=f"{a.preset}-dense", out=str(a.out / name / "dense")), console=quiet
            )
            upcycle(from_pretrained(dense.checkpoint, dtype="fp32"), 8, 2, 1).save_pretrained(a.out / name / "init")
            # the upcycled model's val bpb before it trains: one step at a learning rate that moves nothing
            frozen = dict(steps=1, minutes=None, lr=1e-12, min_lr=0.0, warmup_steps=0)
            init = str(a.out / name / "init")
            step0 = pretrain(half.replace(init=init, out=str(a.out / name / "s0"), **frozen), console=quiet)
            result = pretrain(
                half.replace(init=str(a.out / name / "init"), out=str(a.out / name / "moe")), console=quiet
            )
            extra = f"dense {dense.val['bpb']:.3f} -> upcycled at step 0 {step0.val['bpb']:.3f}"
        else:
            result = pretrain(base.replace(out=str(a.out / name), **VARIANTS[name]), console=quiet)
            extra = ""
        model = from_pretrained(result.checkpoint)
        row = dict(
            variant=name,
            params_m=model.num_params() / 1e6,
            active_m=model.num_params(active=True) / 1e6,
            tok_s=result.tok_per_s,
            steps=result.step,
            val_bpb=result.val["bpb"],
            minutes=(time.time() - t0) / 60,
            load=load,
            note=extra,
        )
        rows.append(row)
        print(
            f"{name:17s} val bpb {row['val_bpb']:.4f} | {row['tok_s']:,.0f} tok/s | {row['steps']} steps | "
            f"{row['params_m']:.2f}M ({row['active_m']:.2f}M active) | load {load:.1f} {extra}",
            flush=True,
        )
    write(rows, a.out, f"Architecture options at equal {'steps' if a.steps else 'wall clock'} ({budget} each)")


def write(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepsail.files import atomic_path, atomic_write_json, atomic_write_text

    base = next((r for r in rows if r["variant"] == "baseline"), rows[0])
    lines = [
        "| variant | val bpb | vs baseline | tok/s | steps | params (active) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['val_bpb']:.4f} | {r['val_bpb'] - base['val_bpb']:+.4f} | {r['tok_s']:,.0f} | "
            f"{r['steps']} | {r['params_m']:.2f}M ({r['active_m']:.2f}M) | {r['note']} |"
        )
    print("\n".join(lines))
    atomic_write_text(out / "ablations.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "ablations.json", rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r["variant"] for r in rows]
    ax1.barh(names[::-1], [r["val_bpb"] for r in rows][::-1], color="C0")
    ax1.axvline(base["val_bpb"], color="k", lw=0.8, ls="--")
    lo = min(r["val_bpb"] for r in rows)
    ax1.set(xlabel="val bits/byte (lower is better)", xlim=(lo * 0.97, max(r["val_bpb"] for r in rows) * 1.01))
    ax2.barh(names[::-1], [r["tok_s"] for r in rows][::-1], color="C1")
    ax2.set(xlabel="training tok/s")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out / "ablations.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    print(json.dumps({"out": str(out / "ablations.md")}))


if __name__ == "__main__":
    main()
