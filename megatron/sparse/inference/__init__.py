"""Compressed 2:4 inference: the weight format, the CPU kernel, ``SparseLinear24`` and
``sparsify`` for ``transformers`` models (docs/inference.md)."""

from megatron.sparse.inference.format import Compressed24, compress, decompress
from megatron.sparse.inference.module import DispatchConfig, SparseLinear24
from megatron.sparse.inference.sparsify import sparsify

__all__ = ["Compressed24", "DispatchConfig", "SparseLinear24", "compress", "decompress",
           "sparsify"]
