"""Forward-only policy-gradient estimate for Bernoulli keep-probabilities.

Each unit is kept with probability ``s``; a step draws ``K`` masks ``m_k ~ Bernoulli(s)`` and
measures the masked model's loss ``L_k``. With a moving-average baseline ``delta`` the estimates
of ``d E[L] / d s`` are

* ``"normalized"`` (the public code's form):
  ``sum_k (L_k - delta) (m_k - s) / sqrt(s (1 - s)) / (K - 1)``;
* ``"score"`` (the textbook score function):
  ``sum_k (L_k - delta) (m_k - s) / (s (1 - s)) / K``.

The uniforms behind the masks are counter-based (a hash of the run seed, step, sample, pool and
the unit's index in the *unsharded* pool), so every tensor-parallel layout, and a resumed run,
draws the same masks.
"""

from __future__ import annotations

import torch

from megatron.sparse.mask import combine_seeds, counter_uniform

ESTIMATORS = ("normalized", "score")
_EPS = 1e-7  # keeps the denominators finite at s = 0 or 1 (where m = s exactly)


def check_estimator(name: str) -> None:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")


def sample_mask(probs: torch.Tensor, *, seed: int, step: int, sample: int,
                pool: int) -> torch.Tensor:
    """bool mask of ``probs``' shape, ``True`` with probability ``probs`` (counter-based)."""
    index = torch.arange(probs.numel(), dtype=torch.int64)
    u = counter_uniform(combine_seeds(seed, step, sample, pool), index)
    return (u.reshape(probs.shape) < probs.float().cpu()).to(probs.device)


def policy_gradient(losses: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor,
                    baseline: float, *, estimator: str = "normalized") -> torch.Tensor:
    """Estimate ``d E[L] / d probs`` from ``K`` losses ``[K]`` and their masks ``[K, *probs]``."""
    check_estimator(estimator)
    k = losses.shape[0]
    adv = (losses.double() - baseline).reshape(k, *([1] * probs.dim()))
    p = probs.double()
    var = (p + _EPS) * (1 - p + _EPS)
    centred = masks.double() - p
    if estimator == "normalized":
        return ((adv * centred / var.sqrt()).sum(0) / max(k - 1, 1)).to(probs.dtype)
    return ((adv * centred / var).sum(0) / k).to(probs.dtype)


class MovingBaseline:
    """``delta <- (1 - a) delta + a mean_k L_k``, started at the first step's mean.

    As in the public code, the step's own mean enters the baseline before it is used.
    """

    def __init__(self, alpha: float = 0.2, value: float | None = None):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"baseline rate must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.value = value

    def update(self, mean_loss: float) -> float:
        if self.value is None:
            self.value = float(mean_loss)
        else:
            self.value = (1 - self.alpha) * self.value + self.alpha * float(mean_loss)
        return self.value
