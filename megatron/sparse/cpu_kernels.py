"""The fused CPU mask kernels (``csrc/mask_kernels.c``): built with the system C compiler on
first use, cached, and called through ctypes on float32 tensors.

The build (:mod:`megatron.sparse.native`) takes about a second and is cached per source, compiler
and CPU kind. Without a working compiler, or with ``MEGATRON_SPARSE_MASK_KERNEL=torch``,
:func:`load` returns None and callers use the PyTorch implementation of the same formulas.
"""

from __future__ import annotations

import ctypes
import functools
import platform

import torch

from megatron.sparse import native

SOURCE = native.CSRC / "mask_kernels.c"
ENV_SWITCH = "MEGATRON_SPARSE_MASK_KERNEL"


class MaskParams(ctypes.Structure):
    """Mirror of ``mask_params`` in the C source."""

    _fields_ = [("rows", ctypes.c_int64), ("groups", ctypes.c_int64),
                ("group_offset", ctypes.c_int64), ("total_groups", ctypes.c_int64),
                ("seed", ctypes.c_uint32), ("a", ctypes.c_float), ("b", ctypes.c_float),
                ("noise", ctypes.c_int), ("hard", ctypes.c_int), ("threads", ctypes.c_int)]


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, params = ctypes.c_void_p, ctypes.POINTER(MaskParams)
    lib.msk_forward.argtypes = [ptr, ptr, ptr, ptr, ptr, params]
    lib.msk_backward.argtypes = [ptr, ptr, ptr, ptr, ptr, ctypes.c_float, ptr, params]
    for fn in (lib.msk_forward, lib.msk_backward):
        fn.restype = None
    return lib


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (PyTorch fallback) with one warning saying why."""
    return native.load_kernel(SOURCE, cache_name="mask-kernel", env_switch=ENV_SWITCH,
                              bind=_bind, what="CPU mask kernel",
                              fallback="the 2:4 mask runs on the slower PyTorch path")


def supports(*tensors: torch.Tensor) -> bool:
    """True if the kernels can run on these tensors (CPU float32) and the library loaded."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and \
        load() is not None


def _params(logits: torch.Tensor, index, sample) -> MaskParams:
    rows, groups, _ = logits.shape
    return MaskParams(rows=rows, groups=groups, group_offset=index.group_offset,
                      total_groups=index.total_groups, seed=sample.seed,
                      a=sample.kappa / sample.tau, b=1.0 / sample.tau, noise=int(sample.noise),
                      hard=int(sample.hard), threads=torch.get_num_threads())


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True) if platform.system() == "Linux" else None
    except OSError:
        return None


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like`` whose large pages are backed by transparent huge pages where the
    kernel allows it (``madvise`` mode): a fresh 100 MB+ buffer otherwise costs tens of thousands
    of page faults, a large part of the mask kernels' time on CPU. Advisory only."""
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    libc, nbytes = _libc(), out.numel() * out.element_size()
    if libc is not None and nbytes >= 4 * _HUGE_PAGE:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    return out


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def forward(weight: torch.Tensor, logits: torch.Tensor, index,
            sample) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * mask, ||weight * mask||^2)`` for a float32 ``[rows, in]`` weight and
    ``[rows, in/4, 6]`` logits; the squared norm (the regulariser) comes from the same pass, as a
    float32 scalar accumulated per row in float64."""
    weight, logits = weight.contiguous(), logits.contiguous()
    out = _empty_like(weight)
    row_sums = torch.empty(logits.shape[0], dtype=torch.float64)
    prm = _params(logits, index, sample)
    load().msk_forward(_ptr(logits), _ptr(weight), _ptr(out), _ptr(row_sums),
                       _ptr(index.row_ids), ctypes.byref(prm))
    return out, row_sums.sum().float()


def backward(weight: torch.Tensor, logits: torch.Tensor, index, sample, *,
             grad_out: torch.Tensor | None, reg_scale: float = 0.0,
             need_weight_grad: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(grad_weight, grad_logits)`` of ``<grad_out, W * M> + reg_scale / 2 * ||W * M||^2``."""
    weight, logits = weight.contiguous(), logits.contiguous()
    if grad_out is not None:
        grad_out = grad_out.contiguous().float()
    grad_logits = _empty_like(logits)
    grad_weight = _empty_like(weight) if need_weight_grad and grad_out is not None else None
    prm = _params(logits, index, sample)
    load().msk_backward(_ptr(logits), _ptr(weight), _ptr(grad_out), _ptr(grad_logits),
                        _ptr(grad_weight), float(reg_scale), _ptr(index.row_ids),
                        ctypes.byref(prm))
    return grad_weight, grad_logits
