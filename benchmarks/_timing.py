"""Timing shared by the benchmarks: CUDA events on a card, the wall clock on the host."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch


def timed(fn, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of `fn` over `reps` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def timed_ms(fn, reps: int) -> float:
    """Median wall-clock milliseconds of `fn` over `reps` calls, after one (host-side work)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cpu_name() -> str:
    """The host CPU's model name (results on the CPU depend on it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
