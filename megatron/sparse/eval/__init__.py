"""Perplexity evaluation, Megatron side and Hugging Face side, on one shared token stream."""
