"""SwiGLU MLP whose fc1 mask (logits or fixed choices) and SLoRB ``S`` reshard, and whose mask
draws noise, like its weight."""

from __future__ import annotations

import torch
from megatron.core.transformer.mlp import MLP, apply_swiglu_sharded_factory
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron.sparse.layers import MASK_TENSORS
from megatron.sparse.sampling import NoiseIndex
from megatron.sparse.slorb import FC1_ROW_TENSORS


class SparseMLP(MLP):
    """megatron-core MLP; ``linear_fc1``'s mask gets the same [gate_r; up_r] treatment.

    Each TP rank holds ``[gate_r; up_r]`` rows of fc1, so its mask tensor (``mask_logits`` or
    ``mask_choice``, one row per weight row) is split into gate and up halves on save and
    concatenated back on load, exactly like the weight, and the logits' Gumbel noise is that of
    the same rows of the unsharded ``[gate; up]`` layer.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        fc1 = self.linear_fc1
        if self.config.gated_linear_unit and getattr(fc1, "mask_kind", None) == "logits":
            rank, size = get_pg_rank(fc1.tp_group), get_pg_size(fc1.tp_group)
            rows, groups = fc1.mask_shape("fixed")
            half = rows // 2
            local = torch.arange(half, dtype=torch.int32, device=fc1.weight.device) + rank * half
            fc1.noise_index = NoiseIndex(torch.cat([local, local + half * size]),
                                         group_offset=0, total_groups=groups)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if not self.config.gated_linear_unit:
            return sharded
        singleton = (metadata or {}).get("singleton_local_shards", False)
        for name in (*MASK_TENSORS.values(), *FC1_ROW_TENSORS):
            key = f"{prefix}linear_fc1.{name}"
            if key in sharded:
                sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets,
                                                            singleton)
        return sharded
