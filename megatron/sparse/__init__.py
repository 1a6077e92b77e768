"""megatron-sparse: 2:4 semi-structured sparsity for LLaMA-family models on megatron-core.

Importing this package has no side effects: the CPU shim lives in
:mod:`megatron.sparse.compat` and is applied explicitly by entry points.
"""

__version__ = "0.1.0"
