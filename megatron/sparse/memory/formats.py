"""Bytes per element of what checkpoints and the tools hold, as named constants.

Checkpoint formats assumed (the storage layout of issue 15): a converted checkpoint stores the
weights only; a one-shot or imported mask is a uint8 2:4 choice per group of 4 weights; a
training checkpoint stores the fp32 logits and their AdamW moments. ``legacy`` in
:class:`~megatron.sparse.memory.MemoryConfig` models the earlier layout, where every checkpoint
(and so every tool's model) carried the fp32 logits.
"""

from __future__ import annotations

import torch

GROUP = 4
"""Weights per 2:4 group."""
CANDIDATES = 6
"""2:4 candidates per group (one logit each)."""
LOGIT_BYTES_PER_WEIGHT = CANDIDATES * 4 / GROUP
"""fp32 mask logits ``[numel / 4, 6]``: 6 bytes per masked weight (in memory and on disk)."""
CHOICE_BYTES_PER_WEIGHT = 1 / GROUP
"""One-shot / imported mask on disk: one uint8 candidate index per group of 4 weights."""
PACKED_MASK_BYTES_PER_WEIGHT = 1 / 8
"""Exported mask file: one bit per weight (``np.packbits``, before compression)."""
EVAL_MASK_BYTES_PER_WEIGHT = 1
"""The boolean ``[rows, in]`` eval mask a sparse layer caches after its first eval forward."""
SOFT_MASK_SAVED_BYTES_PER_WEIGHT = 6
"""PyTorch mask path (GPU, non-fp32 CPU): the fp32 softmax probabilities ``[numel / 4, 6]`` each
sparse linear's soft mask keeps for backward (the fused fp32 CPU kernel keeps none)."""
REGULARISER_SAVED_BYTES_PER_WEIGHT = 14
"""PyTorch mask path with the regulariser ``||sg(W) * M||^2`` recomputed after the forward: the
probabilities again (6), the fp32 weight copy (4) and the fp32 product (4), per masked weight."""
ADAMW_STATES = 2
"""AdamW moments (exp_avg, exp_avg_sq) per trainable element, fp32 like the logits."""
LOSS_FP32_COPIES = 2
"""fp32 tensors of ``[s, b, vocab / tp]`` in megatron's vocab-parallel cross entropy of
half-precision logits: the fp32 cast and the softmax kept for backward (fp32 logits need no
cast: one copy fewer)."""
TOKEN_BYTES = 8
"""int64 token ids (calibration windows)."""

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16,
                                  "fp32": torch.float32}
"""``--dtype`` names."""


def dtype_bytes(name: str) -> int:
    """Bytes per element of a ``--dtype`` name, with a one-line error for unknown ones."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return torch.empty(0, dtype=DTYPES[name]).element_size()
