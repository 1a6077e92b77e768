"""The CPU 2:4-sparse x dense matmul (``csrc/sparse24_matmul.c``): built on first use, ctypes.

Same build and fallback rules as the mask kernels (:mod:`megatron.sparse.cpu_kernels`): without a
working compiler, or with ``MEGATRON_SPARSE_INFERENCE_KERNEL=torch``, :func:`load` returns None
and :class:`~megatron.sparse.inference.module.SparseLinear24` runs a dense matmul instead.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from megatron.sparse import native
from megatron.sparse.inference.format import Compressed24

SOURCE = native.CSRC / "sparse24_matmul.c"
ENV_SWITCH = "MEGATRON_SPARSE_INFERENCE_KERNEL"
DTYPES = (torch.float32, torch.bfloat16)


class S24Params(ctypes.Structure):
    """Mirror of ``s24_params`` in the C source."""

    _fields_ = [("rows", ctypes.c_int64), ("in_", ctypes.c_int64), ("batch", ctypes.c_int64),
                ("threads", ctypes.c_int)]


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr = ctypes.c_void_p
    for fn in (lib.s24_matmul_f32, lib.s24_matmul_bf16, lib.s24_matmul_bf16x):
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, ctypes.POINTER(S24Params)]
        fn.restype = None
    lib.s24_simd_width.restype = ctypes.c_int
    lib.s24_has_bf16_dot.restype = ctypes.c_int
    return lib


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library, or None (dense fallback) with one warning saying why."""
    return native.load_kernel(SOURCE, cache_name="sparse24-kernel", env_switch=ENV_SWITCH,
                              bind=_bind, what="CPU 2:4 matmul kernel",
                              fallback="sparse linears run as dense matmuls")


def supports(packed: Compressed24, x: torch.Tensor) -> bool:
    """True if the kernel can run this product (CPU, fp32/bf16 weight, input of the weight's
    dtype) and the library loaded."""
    return (packed.values.device.type == "cpu" and x.device.type == "cpu"
            and packed.values.dtype in DTYPES and x.dtype == packed.values.dtype
            and load() is not None)


def matmul(packed: Compressed24, x: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for ``x`` ``[..., in]``, in ``x``'s dtype (float32 accumulation;
    bf16 weights with bf16 inputs use the CPU's bf16 dot products where it has them)."""
    rows, cols = packed.shape
    if x.shape[-1] != cols:
        raise ValueError(f"input has {x.shape[-1]} features, the sparse weight expects {cols}")
    lead = x.shape[:-1]
    lib = load()
    bf16 = packed.values.dtype == torch.bfloat16
    if bf16 and x.dtype == torch.bfloat16 and lib.s24_has_bf16_dot():
        fn, x2 = lib.s24_matmul_bf16x, x.reshape(-1, cols).contiguous()  # bf16 dot products
    else:
        fn = lib.s24_matmul_bf16 if bf16 else lib.s24_matmul_f32
        x2 = x.reshape(-1, cols).float().contiguous()
    y = torch.empty(x2.shape[0], rows, dtype=torch.float32)
    b = None if bias is None else bias.detach().float().contiguous()
    prm = S24Params(rows=rows, in_=cols, batch=x2.shape[0], threads=torch.get_num_threads())
    fn(packed.values.data_ptr(), packed.meta.data_ptr(), x2.data_ptr(), y.data_ptr(),
       None if b is None else b.data_ptr(), ctypes.byref(prm))
    return (y if x.dtype == torch.float32 else y.to(x.dtype)).view(*lead, rows)
