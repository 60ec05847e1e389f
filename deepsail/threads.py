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


def _idle_jiffies() -> tuple[int, int] | None:
    """(idle, total) CPU time over all cores since boot, from /proc/stat (None where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


def free_cores(window_s: float = 0.05) -> tuple[int, int]:
    """(free, usable) cores: the cores this process may run on, and how many of them sat idle over `window_s`
    (rounded, at least one). Where /proc/stat is missing, the 1-minute load average stands in."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    total_cores = os.cpu_count() or usable
    before = _idle_jiffies()
    if before is not None:
        time.sleep(window_s)
        after = _idle_jiffies()
        idle, total = after[0] - before[0], after[1] - before[1]
        busy = total_cores * (1 - idle / total) if total > 0 else 0.0
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
