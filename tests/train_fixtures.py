"""Tiny checkpoints and token files for the trainer tests."""

from __future__ import annotations

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron.sparse import checkpoint, parallel
from tests.tiny import tiny_gqa


def write_tokens(prefix: str, *, docs: int, doc_len: int, vocab: int, seed: int = 0) -> None:
    """A ``.bin/.idx`` corpus of random documents."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(docs):
        builder.add_document(rng.integers(0, vocab, doc_len, dtype=np.int32), [doc_len])
    builder.finalize(prefix + ".idx")


def _save_tiny(root: str, overrides: dict, mask_source: str) -> None:
    torch.manual_seed(0)
    args = tiny_gqa(**overrides)
    model = args.build()
    checkpoint.save_checkpoint(root, model, iteration=0, args=args,
                               meta={"mask_source": mask_source})


def tiny_checkpoint(root: str, *, mask_source: str = "none", **overrides) -> str:
    """Save a randomly initialised tiny GQA model as a TP=1 checkpoint (in this process)."""
    with parallel.distributed(1):
        _save_tiny(root, overrides, mask_source)
    return root
