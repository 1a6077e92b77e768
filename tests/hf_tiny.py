"""Tiny random Hugging Face LLaMA checkpoints of each family, for conversion tests."""

from __future__ import annotations

import torch

FAMILIES = {
    # LLaMA-2: multi-head attention, separate lm_head
    "llama2_mha": dict(num_attention_heads=8, num_key_value_heads=8, rope_theta=10000.0,
                       tie_word_embeddings=False),
    # LLaMA-3: GQA, rope_theta 5e5
    "llama3_gqa": dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                       tie_word_embeddings=False),
    # LLaMA-3.1: GQA + llama3 rope scaling (short original context so scaling matters here)
    "llama31_rope_scaling": dict(num_attention_heads=8, num_key_value_heads=2,
                                 rope_theta=500000.0, tie_word_embeddings=False,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 16}),
    # SmolLM2-like: tied embeddings, GQA
    "tied_gqa": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=100000.0,
                     tie_word_embeddings=True),
}


def tiny_hf_model(family: str, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` (float32) of a family."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         vocab_size=128, max_position_embeddings=128, rms_norm_eps=1e-6,
                         **FAMILIES[family])
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


class PicklePayload:
    """An arbitrary class: a checkpoint holding it can only be loaded by full unpickling."""
