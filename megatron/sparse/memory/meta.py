"""Parameter counts of the real GPTModel built on the meta device, at any TP size, in one process.

The model is the one the tools build (:meth:`LlamaArgs.build`), constructed under
``torch.device("meta")`` so no storage is allocated; megatron's TP groups come from a
single-process ``fake`` process group of ``tp`` ranks (this process is rank 0), so the shapes are
exactly those of TP rank 0.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron.sparse.layers import sparse_layers
from megatron.sparse.model import LlamaArgs


@dataclass(frozen=True)
class ShardCounts:
    """Element counts of one TP rank's shard of the model."""

    weights: int
    """Elements of every weight (embeddings, linears, norms; a tied embedding once)."""
    sparse_weights: int
    """Elements of the 2:4-masked linear weights (qkv, proj, fc1, fc2 of every layer)."""
    mask_logits: int
    """Elements of the fp32 mask logits the model holds (``sparse_weights / 4 * 6``)."""
    largest_sparse_linear: int
    """Elements of the largest masked weight (one layer's transient copies)."""
    layer_sparse_weights: int
    """Masked-weight elements of one decoder layer."""


@contextlib.contextmanager
def fake_tensor_parallel(tp: int):
    """megatron-core TP groups of size ``tp`` in this process, over a fake process group."""
    if dist.is_initialized():
        raise RuntimeError("the meta-device estimate needs a process without a process group")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron.sparse.compat import apply_cpu_shim

    apply_cpu_shim()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 create_gloo_process_groups=False)
        yield
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def build_meta_model(args: LlamaArgs, *, params_dtype: torch.dtype):
    """TP rank 0's sparse GPTModel on the meta device (inside :func:`fake_tensor_parallel`)."""
    with torch.device("meta"):
        return args.build(params_dtype=params_dtype)


@lru_cache(maxsize=64)
def _count(args_key: str, tp: int) -> ShardCounts:
    args = LlamaArgs.from_dict(json.loads(args_key))
    args.validate(tp)
    with fake_tensor_parallel(tp):
        model = build_meta_model(args, params_dtype=torch.bfloat16)
        weights = sum(p.numel() for n, p in model.named_parameters()
                      if not n.endswith("mask_logits"))
        logits = sum(p.numel() for n, p in model.named_parameters() if n.endswith("mask_logits"))
        layers = sparse_layers(model)
        sparse = [layer.weight.numel() for _, layer in layers]
        per_layer = sum(layer.weight.numel() for _, layer in sparse_layers(model.decoder.layers[0]))
    return ShardCounts(weights=weights, sparse_weights=sum(sparse), mask_logits=logits,
                       largest_sparse_linear=max(sparse), layer_sparse_weights=per_layer)


def shard_counts(args: LlamaArgs, tp: int) -> ShardCounts:
    """Counts of TP rank 0's shard of ``args`` at TP ``tp`` (cached per architecture and TP)."""
    return _count(json.dumps(args.to_dict(), sort_keys=True), tp)
