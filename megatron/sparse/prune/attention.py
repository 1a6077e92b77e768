"""Causal core attention through torch's fused ``scaled_dot_product_attention``, for calibration.

megatron-core's local ``DotProductAttention`` materialises the ``[b, heads, s, s]`` scores
(baddbmm, masked softmax, bmm); on CPU that is about a quarter of a one-shot pruning run at
seq 512. The calibration driver runs every layer twice on a causal mask without dropout, where
the fused kernel computes the same function: :func:`fused_causal_attention` swaps it in for the
duration of a ``with`` block and puts the original modules back afterwards (nothing is saved
with it). Layers whose attention is anything else (Transformer Engine, softmax offsets, query-key
layer scaling, sliding windows, context parallelism) keep theirs.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


class FusedCausalAttention(torch.nn.Module):
    """``DotProductAttention``'s forward for a causal mask, as one SDPA call (GQA included)."""

    def __init__(self, *, num_heads: int, num_groups: int, scale: float):
        super().__init__()
        if num_heads % num_groups != 0:
            raise ValueError(f"{num_heads} attention heads are not a multiple of {num_groups} "
                             f"query groups")
        self.num_heads, self.num_groups, self.scale = num_heads, num_groups, scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """``[s, b, heads, d]`` query, ``[s, b, groups, d]`` key/value -> ``[s, b, heads * d]``."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("fused calibration attention takes no bias or packed sequences")
        seq, batch = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if self.num_heads != self.num_groups:  # head h reads group h // (heads / groups)
            repeat = self.num_heads // self.num_groups
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)


def _replacement(core) -> FusedCausalAttention | None:
    if type(core) is not DotProductAttention:
        return None
    cfg = core.config
    if (getattr(cfg, "softmax_type", "vanilla") != "vanilla" or cfg.apply_query_key_layer_scaling
            or getattr(cfg, "window_size", None) is not None
            or getattr(cfg, "context_parallel_size", 1) != 1
            or (core.training and cfg.attention_dropout > 0)):
        return None
    return FusedCausalAttention(num_heads=core.num_attention_heads_per_partition,
                                num_groups=core.num_query_groups_per_partition,
                                scale=float(core.softmax_scale))


@contextmanager
def fused_causal_attention(layers):
    """Within the block, run the core attention of ``layers`` with SDPA where it is equivalent.

    Only for inputs under a causal mask (the mask argument is then ignored).
    """
    swapped = []
    try:
        for layer in layers:
            attn = getattr(layer, "self_attention", None)
            fused = _replacement(getattr(attn, "core_attention", None))
            if fused is not None:
                swapped.append((attn, attn.core_attention))
                attn.core_attention = fused
        yield len(swapped)
    finally:
        for attn, original in swapped:
            attn.core_attention = original
