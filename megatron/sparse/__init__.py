"""megatron-sparse: 2:4 semi-structured sparsity for LLaMA-family models on megatron-core.

Importing this package has one side effect: a warning filter for megatron-core's import-time
notices that it falls back to torch modules without Transformer Engine / apex (expected on CPU
and without the GPU extras, nothing a user can act on). It is installed here, before anything
imports megatron.core, and matches only those messages. The CPU shim lives in
:mod:`megatron.sparse.compat` and is applied explicitly by entry points.
"""

import warnings as _warnings

_warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex (is|are) not installed",
                         category=UserWarning, module=r"megatron\.core(\.|$)")

__version__ = "0.1.0"
