"""Store one-shot masks in a sparse layer: logits that encode the mask exactly.

The eval mask of a sparse layer is the argmax of its ``mask_logits``; :func:`logits_for_mask`
writes ``margin`` on the mask's candidate and 0 elsewhere, so the argmax reproduces the mask
exactly and the mask-learning trainer can read it back (``eval_mask``) as its prior. The default
margin 1.0 is 100x the N(0, 0.01) init std and > 10x the largest init draw.
"""

from __future__ import annotations

import torch

from megatron.sparse import mask as mask_ops

MASK_MARGIN = 1.0


def logits_for_mask(mask: torch.Tensor, *, margin: float = MASK_MARGIN) -> torch.Tensor:
    """fp32 ``[rows, in/4, 6]`` logits whose argmax is the boolean 2:4 ``mask`` ``[rows, in]``."""
    if margin <= 0:
        raise ValueError(f"margin must be positive, got {margin}")
    groups = mask_ops.weight_to_groups(mask.bool())
    index = mask_ops.mask_to_candidates(groups)
    logits = torch.zeros(*index.shape, mask_ops.NUM_CANDIDATES, dtype=torch.float32,
                         device=mask.device)
    logits.scatter_(-1, index.unsqueeze(-1), float(margin))
    return logits


@torch.no_grad()
def store_mask(layer, mask: torch.Tensor, *, new_weight: torch.Tensor | None = None) -> None:
    """Write ``mask`` into ``layer.mask_logits`` (and ``new_weight`` into its weight, if given)."""
    if tuple(mask.shape) != tuple(layer.weight.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the layer weight "
                         f"{tuple(layer.weight.shape)}")
    layer.mask_logits.copy_(logits_for_mask(mask.to(layer.mask_logits.device)))
    if new_weight is not None:
        layer.weight.copy_(new_weight.to(layer.weight.dtype))
