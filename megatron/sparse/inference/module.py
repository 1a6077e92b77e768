"""``SparseLinear24``: an inference-only linear layer holding a compressed 2:4 weight.

Each call picks the fastest path measured for its shape (docs/inference.md):

- CPU, float32 / bfloat16, at most ``kernel_max_batch_*`` input rows: the fused 2:4 kernel
  (:mod:`megatron.sparse.inference.cpu_kernel`), which moves about half the weight bytes;
- CUDA, bfloat16 / float16, at least ``gpu_min_batch`` rows: ``torch.sparse``'s semi-structured
  weight (cuSPARSELt / CUTLASS);
- otherwise (larger batches, other dtypes, no compiler): a dense ``F.linear`` on the decompressed
  weight ``W * M``, kept after first use when ``cache_dense`` (1.5x the dense weight's memory in
  all; without it each dense call decompresses anew).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron.sparse.inference import cpu_kernel
from megatron.sparse.inference.format import Compressed24, compress, decompress


@dataclass(frozen=True)
class DispatchConfig:
    """When :class:`SparseLinear24` uses which matmul."""

    kernel_max_batch_fp32: int = 64
    """Largest number of input rows (tokens) sent to the CPU kernel for float32 weights; above it
    a dense GEMM is faster (crossover measured by benchmarks/bench_sparse_inference.py)."""
    kernel_max_batch_bf16: int = 8
    """The same for bfloat16 weights (dense bf16 GEMMs use the CPU's bf16 dot products too)."""
    cache_dense: bool = True
    """Keep the decompressed weight after the first dense call (prefill) instead of
    decompressing on every call."""
    gpu_semi_structured: bool = True
    """On CUDA, use ``torch.sparse.to_sparse_semi_structured`` for bf16 / fp16 weights."""
    gpu_min_batch: int = 64
    """Fewest input rows for the semi-structured GPU matmul (decode-sized calls run dense)."""

    def kernel_max_batch(self, dtype: torch.dtype) -> int:
        """The CPU kernel's batch limit for weights of ``dtype`` (0: never)."""
        if dtype == torch.float32:
            return self.kernel_max_batch_fp32
        return self.kernel_max_batch_bf16 if dtype == torch.bfloat16 else 0


class SparseLinear24(nn.Module):
    """``y = x @ (W * M).T + b`` from a compressed 2:4 weight (inference only: no autograd)."""

    def __init__(self, *, packed: Compressed24, bias: torch.Tensor | None = None,
                 config: DispatchConfig | None = None):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.config = config or DispatchConfig()
        self.register_buffer("values", packed.values)
        self.register_buffer("meta", packed.meta)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._dense_cache: torch.Tensor | None = None
        self._semi_cache = None
        self._packed = self.packed

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor | None = None, *,
                    config: DispatchConfig | None = None, name: str = "weight"
                    ) -> "SparseLinear24":
        """Compress ``linear.weight * mask`` (or an already 2:4 weight); ValueError if not 2:4."""
        packed = compress(linear.weight.detach(), mask, name=name)
        return cls(packed=packed, bias=linear.bias, config=config)

    @property
    def packed(self) -> Compressed24:
        """The compressed weight (views of this module's buffers)."""
        return Compressed24(values=self.values, meta=self.meta, in_features=self.in_features)

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): derived weights are stale
        self._dense_cache = self._semi_cache = None
        out = super()._apply(fn, recurse)
        self._packed = self.packed
        return out

    def dense_weight(self) -> torch.Tensor:
        """The decompressed ``W * M`` (cached when ``config.cache_dense``)."""
        if self._dense_cache is not None:
            return self._dense_cache
        dense = decompress(self.packed)
        if self.config.cache_dense:
            self._dense_cache = dense
        return dense

    def _semi_structured(self):
        if self._semi_cache is None:
            from torch.sparse import to_sparse_semi_structured

            try:
                self._semi_cache = to_sparse_semi_structured(decompress(self.packed))
            except (RuntimeError, ValueError, NotImplementedError):  # shape/arch unsupported
                self._semi_cache = False
        return self._semi_cache or None

    def path(self, x: torch.Tensor) -> str:
        """The matmul :meth:`forward` uses: ``kernel``, ``semi_structured`` or ``dense``."""
        rows = x.numel() // max(self.in_features, 1)
        dtype = self.values.dtype
        if x.is_cuda:
            if (self.config.gpu_semi_structured and dtype in (torch.bfloat16, torch.float16)
                    and x.dtype == dtype and rows >= self.config.gpu_min_batch):
                return "semi_structured"
            return "dense"
        if 0 < rows <= self.config.kernel_max_batch(dtype) and \
                cpu_kernel.supports(self._packed, x):
            return "kernel"
        return "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.path(x)
        if path == "kernel":
            return cpu_kernel.matmul(self._packed, x, self.bias)
        if path == "semi_structured":
            weight = self._semi_structured()
            if weight is not None:
                y = F.linear(x.reshape(-1, self.in_features), weight, self.bias)
                return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dense_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.values.dtype}, 2:4 compressed")
