"""A 95 % confidence interval for a ratio measured on several independent draws.

Each draw gives one ratio ``r_d = ours_d / peer_d`` (same calibration windows on both sides).
The interval is Student's t on ``log r_d``, mapped back: ``exp(mean +- t * sd / sqrt(n))``, so it
is symmetric in the sense that swapping the two sides inverts it. The point estimate is the
geometric mean of the ratios.
"""

from __future__ import annotations

import math
import statistics

# Two-sided 95 % quantiles of Student's t, t_{0.975}(df), for df = 1..30 (standard table values).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """``t_{0.975}`` for ``df`` degrees of freedom (normal quantile 1.960 past the table)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 draws (df >= 1), got df={df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """``(geometric mean, low, high)`` of the 95 % t interval of ``ratios`` on the log scale."""
    if len(ratios) < 2:
        raise ValueError(f"a confidence interval needs at least 2 draws, got {len(ratios)}")
    if min(ratios) <= 0:
        raise ValueError(f"ratios must be positive, got {min(ratios)}")
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    mean = statistics.fmean(logs)
    half = t975(n - 1) * statistics.stdev(logs, mean) / math.sqrt(n)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)
