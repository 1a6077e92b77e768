"""Trim: the sparse layers' masks (fixed, or argmax of logits) applied to the weights, at TP=1.

Export runs on one process: ``checkpoint.load_model`` reshards a checkpoint of any TP size to
TP=1, so "merging TP shards" is the checkpoint loader's job and this module only trims.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron.sparse.layers import is_mask_key, sparse_layers


def _check_tp1() -> None:
    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ValueError("export runs at TP=1 on one process (it loads any TP checkpoint "
                         "resharded); launch it with python, not torchrun")


@torch.no_grad()
def eval_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{"decoder.layers.{i}...linear_qkv.weight": bool mask}`` of every sparse layer (TP=1)."""
    _check_tp1()
    return {f"{name}.weight": layer.eval_mask().clone() for name, layer in sparse_layers(model)}


@torch.no_grad()
def masked_state_dict(model: torch.nn.Module,
                      masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's TP=1 state dict with every sparse weight multiplied by its mask.

    Mask tensors and ``_extra_state`` entries are dropped: the result is a dense-layout state dict
    whose sparse weights are exactly 2:4.
    """
    _check_tp1()
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("_extra_state") or is_mask_key(key):
            continue
        if key in masks:
            value = value * masks[key].to(value.dtype)
        out[key] = value.detach().clone()
    return out
