"""Wall time and peak resident memory of a callable, for one-process-per-case tables."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(run: Callable[[], object], repeats: int | None = None) -> dict:
    """Seconds (best of the repeats after a first call) and peak RSS above the start.

    Call in a fresh process: the peak is the process's high-water mark. Without
    ``repeats``: 7 when the first call took under 0.5 s, else 2.
    """
    start = rss_bytes()
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    times = [first]
    for _ in range(repeats if repeats is not None else (7 if first < 0.5 else 2)):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    best = min(times[1:]) if len(times) > 1 else first
    return {"seconds": best, "first_seconds": first, "peak_bytes": max(peak, 0)}
