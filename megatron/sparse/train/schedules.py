"""Per-step schedules: learning rate, Gumbel temperature, logit scaling, regulariser weight."""

from __future__ import annotations

import math


def linear(start: float, end: float, step: int, total: int) -> float:
    """Linear interpolation from ``start`` (step 0) to ``end`` (step ``total - 1``)."""
    if total <= 1:
        return end
    frac = min(max(step / (total - 1), 0.0), 1.0)
    return start + (end - start) * frac


def warmup_cosine(step: int, *, peak: float, minimum: float, warmup: int, total: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``minimum``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = max(total - warmup, 1)
    progress = min(max((step - warmup) / decay_steps, 0.0), 1.0)
    return minimum + 0.5 * (peak - minimum) * (1.0 + math.cos(math.pi * progress))


def regulariser_weight(step: int, *, lam: float, total: int) -> float:
    """``lambda * (1 - t / T)``."""
    return lam * (1.0 - step / max(total, 1))
