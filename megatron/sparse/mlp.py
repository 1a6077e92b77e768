"""SwiGLU MLP whose fc1 mask logits reshard (and draw noise) like its weight."""

from __future__ import annotations

import torch
from megatron.core.transformer.mlp import MLP, apply_swiglu_sharded_factory
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron.sparse.sampling import NoiseIndex


class SparseMLP(MLP):
    """megatron-core MLP; ``linear_fc1.mask_logits`` gets the same [gate_r; up_r] treatment.

    Each TP rank holds ``[gate_r; up_r]`` rows of fc1, so its logits (one row per weight row) are
    split into gate and up halves on save and concatenated back on load, exactly like the weight,
    and their Gumbel noise is that of the same rows of the unsharded ``[gate; up]`` layer.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        fc1 = self.linear_fc1
        if self.config.gated_linear_unit and hasattr(fc1, "noise_index"):
            rank, size = get_pg_rank(fc1.tp_group), get_pg_size(fc1.tp_group)
            half = fc1.mask_logits.shape[0] // 2
            local = torch.arange(half, dtype=torch.int32, device=fc1.weight.device) + rank * half
            fc1.noise_index = NoiseIndex(torch.cat([local, local + half * size]),
                                         group_offset=0, total_groups=fc1.mask_logits.shape[1])

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = f"{prefix}linear_fc1.mask_logits"
        if self.config.gated_linear_unit and key in sharded:
            singleton = (metadata or {}).get("singleton_local_shards", False)
            sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets, singleton)
        return sharded
