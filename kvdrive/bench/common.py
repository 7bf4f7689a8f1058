"""Timing shared by the benchmarks (result files: ``kvdrive.results``)."""

from __future__ import annotations

import statistics
import time

import torch

from kvdrive import device as dev


def time_ms(fn, device: torch.device, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()``: CUDA events around each call on the GPU, a host clock on CPU."""
    for _ in range(warmup):
        fn()
    dev.synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
