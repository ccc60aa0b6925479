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


def _high_water() -> int:
    """The process's peak resident set size (``VmHWM``) in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def measure_warm(run: Callable[[], object], repeats: int = 2) -> dict:
    """Like :func:`measure`, but the peak is that of a call after a warm-up call.

    The first call pays one-time costs (lazy initialisation, allocator pools,
    an operator's probes); after it the kernel's high-water mark is reset
    (``/proc/self/clear_refs``, Linux) and the peak of the second call above the
    resident memory before it is reported: the extra memory of one product.
    """
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    start = rss_bytes()
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        if len(times) == 1:
            peak = _high_water() - start
    return {"seconds": min(times), "first_seconds": first, "peak_bytes": max(peak, 0)}
