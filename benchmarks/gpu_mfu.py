"""Training MFU on one GPU under FSDP2 + torch.compile, as `torchrun -m deepsail pretrain` runs it (issue 14).

    python benchmarks/gpu_mfu.py                     # on a CUDA machine: deepseek-v3-small (MoE) and qwen2-1.5b (dense)
    python benchmarks/gpu_mfu.py --smoke             # anywhere: the same launches on CPU/gloo with a debug preset

Each preset is one `torchrun --nproc_per_node 1 -m deepsail pretrain --dp-shard 1 --compile --precision bf16` run on
the embedded corpus (a 4096-token BPE, so the presets' embeddings shrink to that vocabulary); tok/s and MFU come
from the run's summary.json, which counts 6 x active parameters + causal attention per token against the chip's
bf16 datasheet peak (deepsail.train.metrics). The first steps (compilation, allocator warm-up) are left out of the
trainer's throughput. Goals: MFU >= 45% dense, >= 30% MoE.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"moe": 0.30, "dense": 0.45}


def prepare(folder: Path, max_bytes: int | None) -> Path:
    sys.path.insert(0, str(ROOT))
    from deepsail.data.corpus import default_corpus
    from deepsail.data.prepare import prepare as prepare_data
    from deepsail.data.tokenizer import Tokenizer

    if not (folder / "data" / "manifest.json").is_file():
        tok = Tokenizer.train([d.text for d in default_corpus("train", max_bytes=max_bytes)], vocab_size=4096)
        tok.save(folder / "tokenizer")
        prepare_data(None, folder / "tokenizer", folder / "data", max_bytes=max_bytes, progress=False)
    return folder / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU/gloo, debug preset, a few steps: checks the script")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--out", type=Path, default=Path("runs/gpu_mfu"))
    a = p.parse_args()

    if a.smoke:
        presets = {"moe": "deepseek-v3-debug"}
        extra = ["--device", "cpu", "--precision", "fp32", "--steps", "3", "--batch-size", "2", "--seq-len", "64"]
        data = prepare(a.out / "corpus", max_bytes=100_000)
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke to check the script on CPU")
        presets = {"moe": "deepseek-v3-small", "dense": "qwen2-1.5b"}
        extra = ["--compile", "--precision", "bf16", "--steps", str(a.steps)]
        extra += ["--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len)]
        data = prepare(a.out / "corpus", max_bytes=None)
    rows = []
    for kind, preset in presets.items():
        out = a.out / preset
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        cmd += ["-m", "deepsail", "pretrain", "--data", str(data), "--model-preset", preset, "--dp-shard", "1"]
        cmd += ["--out", str(out), "--eval-every", "0", "--eval-batches", "1", "--ckpt-every", "0", "--log-every", "5"]
        t0 = time.time()
        subprocess.run([*cmd, *extra], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        summary = json.loads((out / "summary.json").read_text())
        rows.append((kind, preset, summary, time.time() - t0))
    print("\n| preset | kind | tok/s | MFU | goal | peak | wall |\n|---|---|---|---|---|---|---|")
    for kind, preset, s, wall in rows:
        print(
            f"| {preset} | {kind} | {s['tok_per_s']:,.0f} | {s['mfu']:.1%} | >= {GOALS[kind]:.0%} | "
            f"{s['peak_flops'] / 1e12:.2f} TFLOP/s ({s['peak_flops_source']}) | {wall:.0f} s |"
        )


if __name__ == "__main__":
    main()
