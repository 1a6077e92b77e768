"""Per-GPU memory and checkpoint-size estimates of each tool, from the model built on meta."""

from megatron.sparse.memory.estimate import TOOLS, MemoryConfig, MemoryEstimate, estimate
from megatron.sparse.memory.presets import PRESETS, preset

__all__ = ["TOOLS", "PRESETS", "MemoryConfig", "MemoryEstimate", "estimate", "preset"]
