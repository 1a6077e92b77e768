"""SwiGLU MLP whose fc1 mask logits reshard like its weight."""

from __future__ import annotations

from megatron.core.transformer.mlp import MLP, apply_swiglu_sharded_factory


class SparseMLP(MLP):
    """megatron-core MLP; ``linear_fc1.mask_logits`` gets the same [gate_r; up_r] treatment.

    Each TP rank holds ``[gate_r; up_r]`` rows of fc1, so its logits (one row per weight row) are
    split into gate and up halves on save and concatenated back on load, exactly like the weight.
    """

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = f"{prefix}linear_fc1.mask_logits"
        if self.config.gated_linear_unit and key in sharded:
            singleton = (metadata or {}).get("singleton_local_shards", False)
            sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets, singleton)
        return sharded
