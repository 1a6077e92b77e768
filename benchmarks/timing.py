"""Shared timing helper of the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import torch


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_times(fns: dict, reps: int) -> dict[str, list[float]]:
    """Wall times of each ``fns[name]()`` over ``reps`` rounds, after one warm-up call each.

    Every round runs all functions once, in turn, so that slow drifts of the machine (clock,
    noisy neighbours) hit all of them alike; ratios are best taken per round
    (:func:`median_ratio`).
    """
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(_timed(fn))
    return samples


def median_ratio(samples: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``samples[num][i] / samples[den][i]``."""
    return statistics.median(a / b for a, b in zip(samples[num], samples[den]))


def median(values: list[float]) -> float:
    return statistics.median(values)
