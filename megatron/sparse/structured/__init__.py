"""Structural pruning: learn which KV groups, MLP channels and whole blocks to remove
(policy gradient, forward passes only) and record the choice as :class:`UnitMasks`."""

from megatron.sparse.structured.units import UnitMasks

__all__ = ["UnitMasks"]
