"""Shared helpers of the one-shot pruners: input checks and "keep the 2 best of each 4"."""

from __future__ import annotations

import torch

GROUP = 4
KEEP = 2


def check_weight(weight: torch.Tensor, what: str = "weight") -> None:
    """Raise a one-line ValueError unless ``weight`` is a 2-D matrix with groupable columns."""
    if weight.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D [rows, in] matrix, got shape {tuple(weight.shape)}")
    if weight.shape[1] % GROUP != 0:
        raise ValueError(f"{what}: input dimension {weight.shape[1]} is not divisible by {GROUP}; "
                         f"2:4 sparsity needs groups of 4 input columns")


def keep_top2(scores: torch.Tensor) -> torch.Tensor:
    """Boolean ``[rows, in]`` mask keeping the 2 highest scores of every group of 4 columns.

    Ties go to the lower column index (stable sort), so the result is deterministic.
    """
    check_weight(scores, "scores")
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // GROUP, GROUP)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :KEEP]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask.reshape(rows, cols)
