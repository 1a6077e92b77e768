"""Corpora, tokenizers and megatron ``.bin/.idx`` token files."""
