"""Activation bytes of one decoder layer, after Korthikanti et al. (2022), for our LLaMA layer.

Korthikanti et al. count, per transformer layer without sequence parallelism, the tensors kept
for backward: ``s*b*h*(34 + 5*a*s/h)`` bytes in fp16 for a GPT layer (GeLU MLP of 4h, dropout).
Our layers differ, so the terms are recounted for megatron-core's LLaMA layer (RMSNorm, RoPE,
GQA, SwiGLU, no dropout), per element of activation dtype ``d`` bytes, at TP ``t``:

* attention: RMSNorm input ``sbh``, QKV input ``sbh``, rotated Q ``sb*q/t``, K and V
  ``2*sb*q/t`` (the local core attention repeats the KV heads; flash attention keeps
  ``2*sb*kv/t``), softmax probabilities ``a*s^2*b/t`` (fp32, plus a ``d`` copy when ``d < 4``;
  flash attention keeps only an fp32 log-sum-exp ``a*s*b/t``), projection input ``sb*q/t``;
* MLP: RMSNorm input ``sbh``, fc1 input ``sbh``, gate, up and silu(gate) ``3*sb*i/t``, fc2 input
  ``sb*i/t``.

``q = heads * head_dim``, ``kv = kv_heads * head_dim``, ``i`` the SwiGLU width. Terms without
``/t`` are replicated on every TP rank (no sequence parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.sparse.model import LlamaArgs

FP32 = 4
SCORE_WORKING_BYTES = 12
"""Bytes per attention-score element alive at once inside megatron's local softmax (scores,
masked scores, fp32 probabilities; measured from ``FusedScaleMaskSoftmax``'s torch path)."""


@dataclass(frozen=True)
class Shape:
    """One micro batch on one TP rank."""

    seq: int
    """Sequence length ``s``."""
    batch: int
    """Micro batch ``b``."""
    tp: int
    """Tensor-parallel size ``t``."""
    act_bytes: int
    """Bytes per activation element ``d`` (the params dtype)."""
    flash: bool
    """Flash/fused core attention (TE on GPU) instead of megatron's local attention."""


def _dims(args: LlamaArgs) -> tuple[int, int, int, int, int]:
    q = args.num_attention_heads * args.kv_channels
    kv = args.num_key_value_heads * args.kv_channels
    return args.hidden_size, q, kv, args.intermediate_size, args.num_attention_heads


def saved_per_layer(args: LlamaArgs, x: Shape) -> int:
    """Bytes one decoder layer keeps for backward (no recomputation)."""
    h, q, kv, i, a = _dims(args)
    sb, t, d = x.seq * x.batch, x.tp, x.act_bytes
    k_and_v = 2 * (kv if x.flash else q)
    attn = sb * d * (2 * h) + sb * d * (q + k_and_v + q) // t
    if x.flash:
        scores = a * x.seq * x.batch * FP32 // t
    else:
        scores = a * x.seq * x.seq * x.batch * (FP32 + (d if d < FP32 else 0)) // t
    mlp = sb * d * (2 * h) + sb * d * (4 * i) // t
    return attn + scores + mlp


def layer_input(args: LlamaArgs, x: Shape) -> int:
    """Bytes of one layer's input ``[s, b, h]`` (what full recomputation keeps per layer)."""
    return x.seq * x.batch * args.hidden_size * x.act_bytes


def working_set(args: LlamaArgs, x: Shape) -> int:
    """Peak bytes of one layer's forward intermediates beyond what it keeps (or, without grad,
    all of a forward's transient tensors): the larger of the attention and MLP phases."""
    h, q, kv, i, a = _dims(args)
    sb, t, d = x.seq * x.batch, x.tp, x.act_bytes
    attn = sb * d * 2 * h + sb * d * (q + kv * 2 + 2 * q) // t
    if not x.flash:
        attn += a * x.seq * x.seq * x.batch * (SCORE_WORKING_BYTES + d) // t
    mlp = sb * d * 3 * h + sb * d * 4 * i // t
    return max(attn, mlp)


def loss_bytes(args: LlamaArgs, x: Shape, *, copies: int) -> int:
    """Output logits ``[s, b, vocab/t]`` in ``d`` plus ``copies`` fp32 tensors of that shape in
    megatron's vocab-parallel cross entropy (one fewer when the logits are fp32 already)."""
    n = x.seq * x.batch * args.vocab_size // x.tp
    return n * (x.act_bytes + FP32 * (copies - (1 if x.act_bytes >= FP32 else 0)))
