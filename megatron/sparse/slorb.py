"""SLoRB (sparse low-rank boosting): a small dense side branch on every sparse linear.

Per sparse linear with weight ``W [N, d]`` and 2:4 mask ``M`` (AST paper, thu-ml)::

    y = x W~^T + (x X^T) S^T,    W~ = M * W

``X [d/k, d]`` is the group-sum projection (``X[i, j] = 1`` for ``j`` in ``[i k, (i+1) k)``) and
``S [N, d/k]`` starts at the mean of each k-group of the pruned weights,
``(W * ~M).view(N, d/k, k).mean(2)``. ``S`` trains; ``X`` trains with ``train_projection``.

``X`` is held as its block-diagonal entries only, ``X_g [d/k, k]`` (``X[i, i k + m] = X_g[i, m]``,
ones at init), so a trainable projection mixes the columns of its own group and nothing else. With
a fixed projection no ``X`` parameter exists: the branch is a view and a sum. The paper's code
trains a dense ``[d/k, d]`` projection; the block form keeps the group sums local under TP.

Under tensor parallelism the branch shards with its linear:

- column-parallel (``linear_qkv``, ``linear_fc1 = [gate; up]``): ``S`` rows are sharded like the
  weight rows (per-KV-group qkv rows, fc1's ``[gate_r; up_r]``), ``X_g`` is replicated, and the
  group sums' gradient is all-reduced over TP (as the linear's input gradient is);
- row-parallel (``linear_proj``, ``linear_fc2``): the input is sharded, so the group sums are
  local; ``S`` is sharded along its columns and ``X_g`` along its rows, and the branch is added to
  the partial output before the row-parallel reduce.

``k`` must divide each layer's input dimension per TP rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

from megatron.sparse.layers import SparseMaskMixin, sparse_layers

DEFAULT_K = 16
META_KEY = "slorb"
"""Key of the ``model_args.json`` entry ``{"k": int, "train_projection": bool}``."""
FC1_ROW_TENSORS = ("slorb.S",)
"""Tensors of ``linear_fc1`` laid out like its weight rows ([gate_r; up_r] per TP rank)."""


def is_slorb_key(key: str) -> bool:
    """Whether a state-dict key names a SLoRB tensor (``<linear>.slorb.S`` or ``.slorb.X``)."""
    return key.endswith(".slorb.S") or key.endswith(".slorb.X")


def group_sums(x: torch.Tensor, k: int, projection: torch.Tensor | None = None) -> torch.Tensor:
    """``x X^T``: ``[..., d] -> [..., d/k]``, the (``projection``-weighted) sum of each k-group."""
    grouped = x.view(*x.shape[:-1], x.shape[-1] // k, k)
    if projection is None:
        return grouped.sum(-1)
    return (grouped * projection).sum(-1)


def check_k(k: int, in_features: int, where: str) -> None:
    """One-line ValueError unless ``k`` is a positive divisor of ``in_features``."""
    if k < 1 or in_features % k != 0:
        raise ValueError(f"SLoRB k={k} does not divide the input dimension per TP rank of {where} "
                         f"({in_features}); pick a k that divides {in_features} (e.g. 16 or 8)")


class SLoRB(torch.nn.Module):
    """The side branch ``(x X^T) S^T`` of one sparse linear's local TP shard."""

    def __init__(self, *, out_features: int, in_features: int, k: int, train_projection: bool,
                 partition_dim: int, tp_group=None, device=None, dtype=torch.float32):
        super().__init__()
        self.k = k
        self.partition_dim = partition_dim  # the linear's weight TP axis (0 column, 1 row)
        self.tp_group = tp_group
        self.S = torch.nn.Parameter(torch.zeros(out_features, in_features // k, device=device,
                                                dtype=dtype))
        set_tensor_model_parallel_attributes(self.S, True, partition_dim, 1)
        if train_projection:
            self.X = torch.nn.Parameter(torch.ones(in_features // k, k, device=device,
                                                   dtype=dtype))
            if partition_dim == 1:
                set_tensor_model_parallel_attributes(self.X, True, 0, 1)
        else:
            self.register_parameter("X", None)

    @property
    def train_projection(self) -> bool:
        return self.X is not None

    def forward(self, input: torch.Tensor, *, allreduce_dgrad: bool = False,
                sequence_parallel: bool = False, **_) -> torch.Tensor:
        """The branch output for the linear's local input (the ``_forward_impl`` arguments)."""
        if sequence_parallel:
            raise ValueError("SLoRB does not support sequence parallelism; run without "
                             "--sequence-parallel")
        sums = group_sums(input, self.k, self.X)
        if allreduce_dgrad:  # column-parallel: every rank's rows contribute to the input grad
            sums = copy_to_tensor_model_parallel_region(sums, group=self.tp_group)
        return F.linear(sums, self.S)

    def axis_map(self, prefix: str) -> dict[str, int]:
        """The TP axis of each sharded tensor (absent: replicated), keyed ``prefix + name``."""
        axes = {prefix + "S": self.partition_dim}
        if self.X is not None and self.partition_dim == 1:
            axes[prefix + "X"] = 0
        return axes

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor, mask: torch.Tensor) -> None:
        """``S = (W * ~M).view(N, d/k, k).mean(2)``, ``X_g = 1`` for the local weight and mask."""
        pruned = weight.float() * ~mask.bool()
        self.S.copy_(pruned.view(weight.shape[0], -1, self.k).mean(2))
        if self.X is not None:
            self.X.fill_(1.0)

    def extra_repr(self) -> str:
        return f"k={self.k}, train_projection={self.train_projection}"


def _layer_mask(name: str, layer: SparseMaskMixin) -> torch.Tensor:
    if layer.mask_kind == "dense":
        raise ValueError(f"SLoRB initialises from the pruned weights, but {name} has no mask "
                         f"(a dense conversion); prune or set its 2:4 masks first")
    return layer.eval_mask()


def attach_slorb(model: torch.nn.Module, *, k: int = DEFAULT_K, train_projection: bool = False,
                 init_from_weights: bool = True) -> list[torch.nn.Parameter]:
    """Give every sparse linear of ``model`` a SLoRB branch; returns the new parameters.

    ``S`` is initialised from each layer's current weight and mask (``init_from_weights=False``
    leaves zeros, for a checkpoint load that fills them). All ``k`` are checked before any layer
    changes; a model that already has SLoRB is an error.
    """
    layers = sparse_layers(model)
    for name, layer in layers:
        if layer.slorb is not None:
            raise ValueError(f"{name} already has a SLoRB branch; attach it once")
        check_k(k, layer.weight.shape[1], name)
    params: list[torch.nn.Parameter] = []
    for name, layer in layers:
        rows, cols = layer.weight.shape
        branch = SLoRB(out_features=rows, in_features=cols, k=k,
                       train_projection=train_projection,
                       partition_dim=layer.weight_partition_dim, tp_group=layer.tp_group,
                       device=layer.weight.device, dtype=layer.weight.dtype)
        if init_from_weights:
            branch.init_from(layer.weight, _layer_mask(name, layer))
        layer.slorb = branch
        params.extend(branch.parameters())
    return params


def slorb_branches(model: torch.nn.Module) -> list[tuple[str, SLoRB]]:
    """``(layer name, branch)`` of every sparse linear with SLoRB."""
    return [(name, layer.slorb) for name, layer in sparse_layers(model)
            if layer.slorb is not None]


def slorb_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The SLoRB parameters of a model (``S``, and ``X`` with a trainable projection)."""
    return [p for _, branch in slorb_branches(model) for p in branch.parameters()]


def slorb_config(model: torch.nn.Module) -> dict[str, Any] | None:
    """``{"k", "train_projection"}`` of a model's SLoRB (None without), for checkpoint meta."""
    branches = slorb_branches(model)
    if not branches:
        return None
    configs = {(b.k, b.train_projection) for _, b in branches}
    if len(configs) > 1 or len(branches) != len(sparse_layers(model)):
        raise ValueError("the model's sparse layers mix SLoRB settings; a checkpoint stores one")
    k, train_projection = configs.pop()
    return {"k": k, "train_projection": train_projection}


def attach_from_meta(model: torch.nn.Module, meta: dict[str, Any]) -> list[torch.nn.Parameter]:
    """Re-attach the (uninitialised) SLoRB a checkpoint's meta records, before loading into it."""
    config = meta.get(META_KEY)
    if not config:
        return []
    return attach_slorb(model, k=int(config["k"]),
                        train_projection=bool(config["train_projection"]),
                        init_from_weights=False)
