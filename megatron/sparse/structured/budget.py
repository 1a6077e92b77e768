"""The keep budget: projecting probabilities onto it, and the final deterministic masks.

During learning every pool (KV groups, channels, blocks: each one global pool over all layers)
is projected after each step onto ``sum s = keep * N`` by the shift ``s <- clamp(s - v, 0, 1)``
with the smallest ``v >= 0`` that meets it (bisection); a pool already under budget is only
clamped, so the projection never raises any ``s``.

The final mask keeps a global top-k of ``s`` per pool, in *chunks*: within a layer the units are
ranked by ``s`` and grouped into chunks of ``multiple`` units (``--channel-multiple`` for the MLP
width, ``--group-multiple`` for the KV groups), so every kept width is a multiple of it; the first
chunk of every kept block is always kept (a kept block is never emptied), the rest compete
globally by their summed ``s``.
"""

from __future__ import annotations

import torch

_BISECTION_STEPS = 60  # halves [0, max s] to 2^-60: far below the 1e-3 budget tolerance


def project_to_budget(probs: torch.Tensor, target_sum: float) -> torch.Tensor:
    """``clamp(probs - v, 0, 1)`` with the smallest ``v >= 0`` such that the sum is <= target."""
    p = probs.double()
    if p.clamp(0, 1).sum() <= target_sum:
        return p.clamp(0, 1).to(probs.dtype)
    lo, hi = 0.0, float(p.max())
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if (p - mid).clamp(0, 1).sum() > target_sum:
            lo = mid
        else:
            hi = mid
    return (p - hi).clamp(0, 1).to(probs.dtype)


def select_chunks(probs: torch.Tensor, kept_layers: torch.Tensor, *, count: int,
                  multiple: int) -> torch.Tensor:
    """bool ``[L, N]``: about ``count`` units (a multiple of ``multiple`` per kept layer).

    ``probs`` ``[L, N]``; only layers in ``kept_layers`` (bool ``[L]``) keep units; each of them
    keeps at least one chunk. ``count`` is rounded down to whole chunks.
    """
    layers, n = probs.shape
    if n % multiple != 0:
        raise ValueError(f"the multiple {multiple} does not divide the {n} units per layer; "
                         f"pick a divisor of {n}")
    order = torch.argsort(probs.double(), dim=1, descending=True, stable=True)
    chunk_scores = probs.double().gather(1, order).reshape(layers, n // multiple, multiple).sum(2)
    live = [int(i) for i in torch.nonzero(kept_layers).flatten()]
    chunks = torch.zeros(layers, n // multiple, dtype=torch.bool)
    for layer in live:
        chunks[layer, 0] = True
    total = count // multiple
    if total < len(live):
        raise ValueError(f"the budget leaves {count} units, fewer than one chunk of {multiple} "
                         f"for each of the {len(live)} kept layers; raise --keep-ratio or lower "
                         f"the multiple")
    rest = chunk_scores[live, 1:].flatten()
    take = min(total - len(live), rest.numel())
    if take > 0:
        # stable descending sort: ties go to the lower layer, then the earlier chunk, so within
        # a layer chunks are always taken as a prefix (their scores are non-increasing)
        picked = torch.argsort(rest, descending=True, stable=True)[:take]
        sub = torch.zeros(rest.numel(), dtype=torch.bool)
        sub[picked] = True
        chunks[live, 1:] = sub.reshape(len(live), -1)
    keep_sorted = chunks.repeat_interleave(multiple, dim=1)
    keep = torch.zeros(layers, n, dtype=torch.bool)
    keep.scatter_(1, order, keep_sorted)
    return keep
