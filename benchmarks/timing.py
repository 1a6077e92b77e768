"""Shared timing helper of the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import torch


def median_time(fn, reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls, after one warm-up call (GPU-synced)."""
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
