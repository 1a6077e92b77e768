"""Wanda 2:4 pruning: score ``|W_ij| * sqrt(mean over tokens of X_j^2)``."""

from __future__ import annotations

import torch

from megatron.sparse.prune.common import check_weight, keep_top2


def wanda_mask(*, weight: torch.Tensor, input_sq_sum: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Boolean 2:4 mask of ``weight`` ``[rows, in]``.

    ``input_sq_sum`` is ``sum over tokens of X_j^2`` (length ``in``) over ``num_tokens`` tokens of
    the layer's calibration input.
    """
    check_weight(weight)
    if input_sq_sum.shape != (weight.shape[1],):
        raise ValueError(f"input statistics have shape {tuple(input_sq_sum.shape)}, expected "
                         f"({weight.shape[1]},) for a weight of shape {tuple(weight.shape)}")
    if num_tokens <= 0:
        raise ValueError("Wanda needs calibration statistics from at least one token")
    norm = (input_sq_sum.double() / num_tokens).sqrt()
    scores = weight.detach().double().abs() * norm.to(weight.device).unsqueeze(0)
    return keep_top2(scores)
