"""Hugging Face LLaMA state dict -> megatron-core (TP=1) state dict. Pure functions.

Layout (DESIGN "Model and conversion"): ``linear_qkv`` rows are, per KV group g,
``[q heads of g; k_g; v_g]``; ``linear_fc1`` is ``[gate; up]``; no Q/K permutation is needed
with megatron's (non-interleaved) RoPE.
"""

from __future__ import annotations

import torch

from megatron.sparse.model import LlamaArgs


def _take(hf: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in hf:
        raise ValueError(f"missing weight {key} in the Hugging Face checkpoint")
    t = hf[key]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{key} is a {type(t).__name__}, not a tensor")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{key} has shape {tuple(t.shape)}, expected {tuple(shape)} for this "
                         f"config")
    return t


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: LlamaArgs) -> torch.Tensor:
    """``[q; k; v]`` (HF) -> per-KV-group ``[q_g; k_g; v_g]`` rows (megatron)."""
    groups, hd = args.num_key_value_heads, args.kv_channels
    per_group = args.num_attention_heads // groups
    q = q.reshape(groups, per_group * hd, *q.shape[1:])
    k = k.reshape(groups, hd, *k.shape[1:])
    v = v.reshape(groups, hd, *v.shape[1:])
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def hf_to_megatron(hf: dict[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """Convert a HF ``LlamaForCausalLM`` state dict; every tensor is checked by name and shape."""
    h = args.hidden_size
    out = {"embedding.word_embeddings.weight":
           _take(hf, "model.embed_tokens.weight", (args.vocab_size, h)),
           "decoder.final_layernorm.weight": _take(hf, "model.norm.weight", (h,))}
    if not args.tie_word_embeddings:
        out["output_layer.weight"] = _take(hf, "lm_head.weight", (args.vocab_size, h))
    out.update(linears_to_megatron(hf, args))
    for i, (attn, mlp) in enumerate(_blocks(args)):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        if attn:
            out[dst + "input_layernorm.weight"] = _take(hf, src + "input_layernorm.weight", (h,))
        if mlp:
            out[dst + "pre_mlp_layernorm.weight"] = _take(
                hf, src + "post_attention_layernorm.weight", (h,))
    return out


def _blocks(args: LlamaArgs) -> list[tuple[bool, bool]]:
    """Per layer: (has attention, has MLP); a sliced model may lack either."""
    from megatron.sparse.structured.hetero import layer_shapes

    return [(s.num_query_groups > 0, s.ffn_hidden_size > 0) for s in layer_shapes(args)]


def linears_to_megatron(hf: dict[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """Only the 4 sparse linears of every layer (weights or same-shaped masks), HF -> megatron."""
    from megatron.sparse.structured.hetero import layer_args

    out = {}
    for i, (attn, mlp) in enumerate(_blocks(args)):
        layer = layer_args(args, i) if args.block_configs else args
        h, hd = layer.hidden_size, layer.kv_channels
        q_rows, kv_rows = layer.num_attention_heads * hd, layer.num_key_value_heads * hd
        ffn = layer.intermediate_size
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        if attn:
            out[dst + "self_attention.linear_qkv.weight"] = interleave_qkv(
                _take(hf, src + "self_attn.q_proj.weight", (q_rows, h)),
                _take(hf, src + "self_attn.k_proj.weight", (kv_rows, h)),
                _take(hf, src + "self_attn.v_proj.weight", (kv_rows, h)), layer)
            out[dst + "self_attention.linear_proj.weight"] = _take(
                hf, src + "self_attn.o_proj.weight", (h, q_rows))
        if not mlp:
            continue
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [_take(hf, src + "mlp.gate_proj.weight", (ffn, h)),
             _take(hf, src + "mlp.up_proj.weight", (ffn, h))], dim=0)
        out[dst + "mlp.linear_fc2.weight"] = _take(hf, src + "mlp.down_proj.weight", (h, ffn))
    return out
