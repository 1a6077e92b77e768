"""Store one-shot masks in a sparse layer as fixed 2:4 choices (one uint8 per group of 4).

The layer becomes (or stays) a ``"fixed"`` mask layer; a checkpoint saved from it stores
``mask_choice`` (``mask_storage: "fixed"``), which eval and export apply as is and the
mask-learning trainer turns into its prior (train/methods.py ``apply_prior``).
"""

from __future__ import annotations

import torch

from megatron.sparse import mask as mask_ops


@torch.no_grad()
def store_mask(layer, mask: torch.Tensor, *, new_weight: torch.Tensor | None = None) -> None:
    """Fix ``layer``'s mask to the boolean 2:4 ``mask`` (and write ``new_weight``, if given)."""
    if tuple(mask.shape) != tuple(layer.weight.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the layer weight "
                         f"{tuple(layer.weight.shape)}")
    choice = mask_ops.mask_to_candidates(mask_ops.weight_to_groups(mask.bool()))
    layer.set_mask_choice(choice.to(torch.uint8))
    if new_weight is not None:
        layer.weight.copy_(new_weight.to(layer.weight.dtype))
