"""megatron-core (TP=1) state dict -> Hugging Face LLaMA state dict. Pure functions.

The inverse of :mod:`megatron.sparse.convert.hf_to_megatron`. It also maps per-weight masks
(any dtype) since it only slices and reshapes.
"""

from __future__ import annotations

import torch

from megatron.sparse.layers import is_mask_key
from megatron.sparse.model import LlamaArgs
from megatron.sparse.slorb import is_slorb_key


def split_qkv(qkv: torch.Tensor, args: LlamaArgs) -> tuple[torch.Tensor, ...]:
    """Per-KV-group ``[q_g; k_g; v_g]`` rows -> HF ``(q, k, v)``."""
    groups, hd = args.num_key_value_heads, args.kv_channels
    per_group = args.num_attention_heads // groups
    grouped = qkv.reshape(groups, (per_group + 2) * hd, *qkv.shape[1:])
    q, k, v = torch.split(grouped, [per_group * hd, hd, hd], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]).contiguous() for t in (q, k, v))


def linear_to_hf(key: str, tensor: torch.Tensor, args: LlamaArgs) -> dict[str, torch.Tensor]:
    """One megatron linear weight (or mask) -> its HF weight(s); other keys -> {}."""
    parts = key.split(".")
    if len(parts) < 5 or parts[0] != "decoder" or parts[1] != "layers":
        return {}
    src = f"model.layers.{parts[2]}."
    name = ".".join(parts[3:5])
    if name == "self_attention.linear_qkv":
        q, k, v = split_qkv(tensor, args)
        return {src + "self_attn.q_proj.weight": q, src + "self_attn.k_proj.weight": k,
                src + "self_attn.v_proj.weight": v}
    if name == "self_attention.linear_proj":
        return {src + "self_attn.o_proj.weight": tensor}
    if name == "mlp.linear_fc1":
        gate, up = torch.chunk(tensor, 2, dim=0)
        return {src + "mlp.gate_proj.weight": gate.contiguous(),
                src + "mlp.up_proj.weight": up.contiguous()}
    if name == "mlp.linear_fc2":
        return {src + "mlp.down_proj.weight": tensor}
    return {}


def slorb_to_hf(state: dict[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """SLoRB tensors -> HF ``<proj>.slorb_S`` (rows split like the weight) and ``.slorb_X``.

    ``slorb.X [in/k, k]`` acts on the input, so every HF projection a megatron linear splits
    into (q/k/v, gate/up) gets its own copy.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not key.endswith(".slorb.S"):
            continue
        base = key.removesuffix(".slorb.S")
        projection = state.get(base + ".slorb.X")
        for hf_key, rows in linear_to_hf(base + ".weight", tensor, args).items():
            stem = hf_key.removesuffix(".weight")
            out[stem + ".slorb_S"] = rows
            if projection is not None:
                out[stem + ".slorb_X"] = projection.clone()
    return out


_DIRECT = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def megatron_to_hf(state: dict[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """Convert a megatron state dict (mask tensors and ``_extra_state`` are ignored; SLoRB
    tensors map by :func:`slorb_to_hf`)."""
    out: dict[str, torch.Tensor] = slorb_to_hf(state, args)
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or is_mask_key(key) or is_slorb_key(key):
            continue
        if key in _DIRECT:
            out[_DIRECT[key]] = tensor
        elif key.endswith("input_layernorm.weight"):
            out[f"model.layers.{key.split('.')[2]}.input_layernorm.weight"] = tensor
        elif key.endswith("pre_mlp_layernorm.weight"):
            out[f"model.layers.{key.split('.')[2]}.post_attention_layernorm.weight"] = tensor
        else:
            out.update(linear_to_hf(key.removesuffix(".weight") + ".weight", tensor, args))
    if args.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight") if k not in out]
    if missing:
        raise ValueError(f"megatron state dict lacks the tensors for {missing}")
    return out
