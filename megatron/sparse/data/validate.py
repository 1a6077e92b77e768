"""Validation of megatron-core ``.bin/.idx`` token files before megatron-core opens them.

megatron-core's ``IndexedDataset`` trusts the index: a damaged ``.idx`` surfaces as an assert, a
numpy buffer error or an ``AttributeError`` from its destructor. :func:`check_indexed` reads the
MMIDIDX layout itself and turns every inconsistency into one :class:`CorruptDataError` line that
names the file, the problem and the fix. Layout (little endian): 9-byte magic ``MMIDIDX\\0\\0``,
u64 version (1), u8 dtype code, u64 sequence count ``S``, u64 document count ``D``; then ``S``
int32 sizes (tokens), ``S`` int64 byte pointers into ``.bin``, ``D`` int64 document offsets
(sequence indices, ``0`` first and ``S`` last); optionally ``S`` int8 modes (multimodal files).
"""

from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")
# megatron-core's DType codes of the integer token types (the float codes 6, 7 hold no token ids)
TOKEN_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}


class CorruptDataError(ValueError):
    """A ``.bin/.idx`` pair that is not a consistent megatron-core dataset."""


@dataclasses.dataclass(frozen=True)
class IndexSummary:
    """What a valid index declares."""

    dtype: type
    """numpy dtype of the token ids in ``.bin``."""
    sequences: int
    """Number of sequences (one per document for files written by tools/preprocess_data.py)."""
    documents: int
    """Number of documents."""
    tokens: int
    """Total tokens over all sequences."""


def _fix(prefix: str) -> str:
    return f"re-run tools/preprocess_data.py --out {prefix} to rewrite it"


def check_files_exist(prefix: str) -> None:
    """One-line ``FileNotFoundError`` unless ``prefix.bin`` and ``prefix.idx`` both exist."""
    missing = [prefix + s for s in (".bin", ".idx") if not os.path.isfile(prefix + s)]
    if missing:
        raise FileNotFoundError(f"tokenised data {' and '.join(missing)} not found; create it "
                                f"with tools/preprocess_data.py --out {prefix}")


def check_indexed(prefix: str) -> IndexSummary:
    """Validate ``prefix.idx`` against itself and ``prefix.bin``; one-line error if not."""
    check_files_exist(prefix)
    idx, bin_path = prefix + ".idx", prefix + ".bin"

    def corrupt(path: str, problem: str) -> CorruptDataError:
        return CorruptDataError(f"{path}: {problem}; {_fix(prefix)}")

    idx_bytes = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise corrupt(idx, f"{idx_bytes} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, code, sequences, documents = _HEADER.unpack(head)
    if magic != MAGIC:
        raise corrupt(idx, f"not a megatron-core index (starts {magic!r}, expected {MAGIC!r})")
    if version != 1:
        raise corrupt(idx, f"index version {version}, this reader knows version 1")
    if code not in TOKEN_DTYPES:
        raise corrupt(idx, f"dtype code {code} is not an integer token type "
                           f"(codes {sorted(TOKEN_DTYPES)})")
    expected = _HEADER.size + sequences * (4 + 8) + documents * 8
    if idx_bytes not in (expected, expected + sequences):
        raise corrupt(idx, f"{idx_bytes} bytes, but its header ({sequences} sequences, "
                           f"{documents} document offsets) needs {expected} (truncated or "
                           f"overwritten)")
    if documents < 1:
        raise corrupt(idx, "no document offsets (at least the leading 0)")
    raw = np.memmap(idx, dtype=np.uint8, mode="r")
    at = _HEADER.size
    sizes = np.frombuffer(raw, dtype=np.int32, count=sequences, offset=at)
    pointers = np.frombuffer(raw, dtype=np.int64, count=sequences, offset=at + 4 * sequences)
    doc_offsets = np.frombuffer(raw, dtype=np.int64, count=documents, offset=at + 12 * sequences)
    if sequences and int(sizes.min()) < 0:
        i = int(np.argmax(sizes < 0))
        raise corrupt(idx, f"sequence {i} has negative size {int(sizes[i])}")
    steps = np.diff(doc_offsets)
    if doc_offsets[0] != 0 or doc_offsets[-1] != sequences or (steps.size and steps.min() < 0):
        bad = int(np.argmax(steps < 0)) + 1 if steps.size and steps.min() < 0 else None
        where = f", decreasing at document {bad}" if bad is not None else ""
        raise corrupt(idx, f"document offsets run from {int(doc_offsets[0])} to "
                           f"{int(doc_offsets[-1])}{where}; they must rise monotonically from 0 "
                           f"to the sequence count {sequences}")
    itemsize = np.dtype(TOKEN_DTYPES[code]).itemsize
    bin_bytes = os.path.getsize(bin_path)
    ends = pointers + sizes.astype(np.int64) * itemsize
    outside = (pointers < 0) | (pointers % itemsize != 0) | (ends > bin_bytes)
    if outside.any():
        i = int(np.argmax(outside))
        raise corrupt(bin_path, f"{bin_bytes} bytes, but sequence {i} of {idx} spans bytes "
                                f"[{int(pointers[i])}, {int(ends[i])}) of "
                                f"{np.dtype(TOKEN_DTYPES[code]).name} tokens (truncated .bin, "
                                f"or .bin and .idx from different runs)")
    tokens = int(sizes.sum(dtype=np.int64))
    del sizes, pointers, doc_offsets, raw
    return IndexSummary(dtype=TOKEN_DTYPES[code], sequences=sequences, documents=documents - 1,
                        tokens=tokens)
