"""Architectures of the LLaMA models the launchers target (values of their HF ``config.json``)."""

from __future__ import annotations

from megatron.sparse.model import LlamaArgs

_LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _args(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int, *,
          max_pos: int, theta: float, eps: float, scaling: dict | None = None) -> LlamaArgs:
    return LlamaArgs(hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=vocab,
                     max_position_embeddings=max_pos, rope_theta=theta, rms_norm_eps=eps,
                     rope_scaling=scaling, tie_word_embeddings=False)


PRESETS: dict[str, LlamaArgs] = {
    "llama2-7b": _args(4096, 32, 32, 32, 11008, 32000, max_pos=4096, theta=1e4, eps=1e-5),
    "llama2-13b": _args(5120, 40, 40, 40, 13824, 32000, max_pos=4096, theta=1e4, eps=1e-5),
    "llama2-70b": _args(8192, 80, 64, 8, 28672, 32000, max_pos=4096, theta=1e4, eps=1e-5),
    "llama3-8b": _args(4096, 32, 32, 8, 14336, 128256, max_pos=8192, theta=5e5, eps=1e-5),
    "llama3-70b": _args(8192, 80, 64, 8, 28672, 128256, max_pos=8192, theta=5e5, eps=1e-5),
    "llama3.1-8b": _args(4096, 32, 32, 8, 14336, 128256, max_pos=131072, theta=5e5, eps=1e-5,
                         scaling=_LLAMA3_ROPE_SCALING),
    "llama3.1-70b": _args(8192, 80, 64, 8, 28672, 128256, max_pos=131072, theta=5e5, eps=1e-5,
                          scaling=_LLAMA3_ROPE_SCALING),
}
"""Model presets by launcher tag (``MODEL_TAG`` of ``scripts/*.sh``)."""


def preset(name: str) -> LlamaArgs:
    """A copy of the preset ``name``, with a one-line error listing the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return LlamaArgs.from_dict(PRESETS[name].to_dict())
