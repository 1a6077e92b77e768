"""Magnitude 2:4 pruning: keep the 2 largest ``|W|`` of every group of 4 input columns."""

from __future__ import annotations

import torch

from megatron.sparse.prune.common import keep_top2


def magnitude_mask(*, weight: torch.Tensor) -> torch.Tensor:
    """Boolean 2:4 mask of ``weight`` ``[rows, in]`` (True = kept)."""
    return keep_top2(weight.detach().float().abs())
