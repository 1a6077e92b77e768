"""megatron-core ``.bin/.idx`` token files: writing documents, reading fixed-length windows."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron.sparse.data.validate import CorruptDataError, check_indexed

__all__ = ["CorruptDataError", "open_indexed", "read_token_windows", "token_dtype",
           "write_indexed"]


def token_dtype(vocab_size: int):
    """uint16 when every id fits, else int32 (what megatron's GPTDataset expects)."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def write_indexed(prefix: str, documents: Iterable[str], *, encode: Callable[[str], list[int]],
                  eod: int, vocab_size: int, log_every: int = 1000) -> dict[str, int]:
    """Tokenise ``documents`` into ``prefix.bin/.idx`` with an EOD after each document.

    Files are written under temporary names and renamed at the end, so an interrupted run leaves
    no half-written dataset. Returns ``{"documents": n, "tokens": n}``.
    """
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp-{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=token_dtype(vocab_size))
    docs = tokens = 0
    start = time.perf_counter()
    try:
        for text in documents:
            ids = list(encode(text)) + [eod]
            builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
            docs += 1
            tokens += len(ids)
            if log_every and docs % log_every == 0:
                rate = tokens / max(time.perf_counter() - start, 1e-9)
                print(f"  {docs} documents, {tokens} tokens ({rate:.0f} tokens/s)", flush=True)
        if docs == 0:
            raise ValueError("the input holds no documents")
        builder.finalize(tmp + ".idx")
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    finally:
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
    return {"documents": docs, "tokens": tokens}


def open_indexed(prefix: str) -> IndexedDataset:
    """megatron-core's ``IndexedDataset`` of ``prefix`` after :func:`check_indexed` accepted it
    (a missing or damaged file is a one-line error, never megatron-core's traceback)."""
    check_indexed(prefix)
    return IndexedDataset(prefix)


def read_token_windows(prefix: str, seq_length: int, num_windows: int | None = None,
                       offset: int = 0) -> torch.LongTensor:
    """``[n, seq_length]`` non-overlapping windows of the concatenated documents of a corpus.

    Starts ``offset`` windows in; ``num_windows=None`` takes all complete windows. Asking for more
    windows than the data holds is a one-line error.
    """
    dataset = open_indexed(prefix)
    stream = np.concatenate([np.asarray(dataset[i], dtype=np.int64)
                             for i in range(len(dataset))])
    del dataset
    available = stream.size // seq_length - offset
    wanted = available if num_windows is None else num_windows
    if wanted <= 0 or available < wanted:
        raise ValueError(f"{prefix} holds {stream.size} tokens = {max(available, 0)} windows of "
                         f"{seq_length} after offset {offset}, fewer than the {wanted} requested")
    start = offset * seq_length
    return torch.from_numpy(stream[start:start + wanted * seq_length].copy()).view(wanted,
                                                                                  seq_length)
