"""Tiny LLaMA configurations shared by the tests."""

from megatron.sparse.model import LlamaArgs


def tiny_gqa(**overrides) -> LlamaArgs:
    """A 2-layer GQA LLaMA (8 heads, 4 KV heads) that TP=1, 2 and 4 can all shard."""
    fields = dict(hidden_size=64, num_layers=2, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=128, vocab_size=256, max_position_embeddings=128,
                  rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    fields.update(overrides)
    return LlamaArgs(**fields)
