"""Intra-op threads default to the free cores, not to every core.

Intra-op threads wait for each other at the end of every op, so one thread that shares its core with another job
stalls the whole step. Measured (2-core Xeon, deepseek-v3-small fp32 batch-1 decode, one busy-loop process beside
it, alternating): 2 threads 17.0 tok/s, 1 thread 52.6 tok/s, 3.1x. torch's default is one thread per core;
every `deepsail` verb starts from the cores that were idle over a short window instead, unless OMP_NUM_THREADS or
the verb's own --threads says otherwise.
"""

from __future__ import annotations

import os
import time


def _idle_fractions(cpus: set[int]) -> dict[int, tuple[int, int]] | None:
    """(idle, total) CPU time since boot of each of `cpus`, from /proc/stat's per-CPU lines (None where there is
    no /proc/stat). Only the cores this process may run on count: a container's other host cores are not ours."""
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu") and line[3].isdigit()]
    except (OSError, ValueError, IndexError):
        return None
    out = {}
    for fields in lines:
        cpu, values = int(fields[0][3:]), [int(v) for v in fields[1:9]]
        if cpu in cpus:
            out[cpu] = (values[3] + values[4], sum(values))  # idle + iowait, all
    return out or None


def free_cores(window_s: float = 0.05) -> tuple[int, int]:
    """(free, usable) cores: the cores this process may run on, and how many of them sat idle over `window_s`
    (rounded, at least one). Where /proc/stat is missing, the 1-minute load average stands in."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    usable = len(cpus)
    before = _idle_fractions(cpus)
    if before is not None:
        time.sleep(window_s)
        after = _idle_fractions(cpus) or {}
        busy = 0.0
        for cpu, (idle0, total0) in before.items():
            idle1, total1 = after.get(cpu, (idle0, total0))
            busy += 1 - (idle1 - idle0) / (total1 - total0) if total1 > total0 else 0.0
    else:
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(usable, round(usable - busy))), usable


_applied = False


def use_free_cores() -> str | None:
    """Set torch's intra-op threads to the free cores once per process (not where OMP_NUM_THREADS is set). Returns
    a line to show where that is fewer than the usable cores, else None."""
    global _applied
    if _applied or os.environ.get("OMP_NUM_THREADS"):
        return None
    _applied = True
    import torch

    free, usable = free_cores()
    if free >= torch.get_num_threads():
        return None
    torch.set_num_threads(free)
    return f"{usable - free} of {usable} cores are busy: computing on {free} thread(s) (OMP_NUM_THREADS=N overrides)"
