"""Where training numbers go: metrics.jsonl, TensorBoard, a loss-curve PNG, and MFU.

MFU (model FLOPs utilisation) = achieved model FLOP/s / the device's peak FLOP/s. The achieved
figure is `model.flops_per_token(seq_len)` (6 * active params + attention, the standard training
count, not counting activation-checkpoint recompute) times tokens/s. The peak comes from:
  - CUDA: NVIDIA's published dense (no sparsity) tensor-core figure for the device, table below;
  - CPU, or a GPU not in the table: a measurement of a large matmul in the training dtype, taken once
    per process, the best ever seen kept per machine in ~/.cache/deepsail/peak_flops.json. A CPU has
    no published number that means anything for one process (it depends on cores, clocks and
    AMX/AVX-512 use), so what a big matmul actually reaches on a quiet machine is the honest ceiling.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from deepsail.files import atomic_path, atomic_write_json, atomic_write_text

# Dense peak FLOP/s, (bf16/fp16 tensor core, fp32 non-tensor core), from NVIDIA datasheets.
# Matched against torch.cuda.get_device_name() in order, so the more specific names come first.
# TF32 (fp32 matmuls with allow_tf32) is half the bf16 figure on every part listed. Parts without
# bf16 (V100, T4) are left out on purpose: they fall through to the measured peak.
CUDA_PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("H100 PCIe", 756e12, 51e12),
    ("H100 NVL", 835e12, 60e12),
    ("H100", 989e12, 67e12),  # SXM
    ("H200", 989e12, 67e12),
    ("H800", 989e12, 67e12),
    ("H20", 148e12, 44e12),
    ("A100", 312e12, 19.5e12),
    ("A800", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("L4", 121e12, 30.3e12),
    ("A10", 125e12, 31.2e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
]


def _cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "deepsail" / "peak_flops.json"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 0.5) -> float:
    """Best FLOP/s of an n x n x n matmul over ~`seconds`: the ceiling a training step can approach."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up (kernel selection, AMX tile config)
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        # best, not mean: on a shared machine other processes only ever make a round slower
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s for this device and precision, where the number came from)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, low_precision, fp32 in CUDA_PEAK_FLOPS:
            if key in name:
                if precision != "fp32":
                    return low_precision, f"{name} datasheet"
                if torch.backends.cuda.matmul.allow_tf32:
                    return low_precision / 2, f"{name} datasheet (tf32)"
                return fp32, f"{name} datasheet"
        key = f"{name}|{precision}"
    else:
        key = f"{cpu_name()}|{torch.get_num_threads()} threads|{precision}"
    cache = _cache_path()
    try:
        table = json.loads(cache.read_text()) if cache.exists() else {}
    except (OSError, ValueError):
        table = {}  # an unreadable cache is only a lost measurement: measure again
    # Measured again once per process and the best kept: a first measurement taken while the machine was busy
    # (0.20 vs 0.35 TFLOP/s bf16 seen on a 2-core Zen 4 during a test run) must not inflate every later MFU.
    best = max(table.get(key, 0.0), _measure_once(device, dtype))
    if best != table.get(key):
        table[key] = best
        try:
            atomic_write_json(cache, table)
        except OSError:
            pass  # a read-only home directory costs half a second per run, not the run
    return best, f"best measured 2048^3 {precision} matmul on this machine, cached in {cache}"


@functools.cache
def _measure_once(device: torch.device, dtype: torch.dtype) -> float:
    return measure_matmul_flops(device, dtype, seconds=0.3)


def save_plot(fig: Any, ax: Any, xlabel: str, ylabel: str, path: Path) -> Path:
    """Label, grid and legend the axes, then write the PNG atomically (a reader never sees half a file)."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a last line cut short by a crash is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


class MetricsLogger:
    """One JSON object per line in `metrics.jsonl`, mirrored to TensorBoard as `<split>/<name>`.

    On resume from step S, rows after S (written by the run that died) are dropped from the JSONL
    and TensorBoard is told to purge them too, so curves never show the abandoned timeline.
    """

    def __init__(self, out_dir: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir = out_dir
        self.path = out_dir / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if resume_step is None:  # a fresh run: no curves from an earlier attempt in this folder
            shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
        elif self.path.exists():
            self.rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        # Rewritten whole (atomically), then appended to a line at a time: a crash can cut at most the last line,
        # which `read_metrics` skips.
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self._file = open(self.path, "a")
        purge = None if resume_step is None else resume_step + 1
        self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        row = {"step": step, "split": split, "time": round(time.time(), 3), **values}
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for name, value in values.items():
            self.tb.add_scalar(f"{split}/{name}", value, step)

    def plot(self, path: Path | None = None) -> Path:
        """Train and val loss against step, written to `loss.png` (replaced atomically)."""
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must precede pyplot
        import matplotlib.pyplot as plt

        path = path or self.out_dir / "loss.png"
        fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
        # Next-token loss on both curves where there is one: the train total also holds the MTP and aux terms, val
        # never does.
        for split, key, style in (("train", "lm_loss", "-"), ("val", "loss", "o-")):
            rows = [r for r in self.rows if r["split"] == split and key in r]
            if not rows and split == "train":
                key = "loss"
                rows = [r for r in self.rows if r["split"] == split and key in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=f"{split} loss", ms=4)
        return save_plot(fig, ax, "step", "loss (nats/token)", path)

    def close(self) -> None:
        self._file.close()
        self.tb.close()
