"""CUDA-event timing shared by the benchmarks."""

from __future__ import annotations

import statistics

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
