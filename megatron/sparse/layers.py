"""Tensor-parallel linear layers whose weight is multiplied by a 2:4 mask.

A layer holds one of three mask kinds, chosen at construction (``mask_kind``):

- ``"dense"``: no mask tensor; the forward uses the plain weight (converted checkpoints).
- ``"fixed"``: a uint8 buffer ``mask_choice [rows_local, in_local / 4]``, the index 0..5 of each
  group's 2:4 candidate (order of :mod:`megatron.sparse.mask`); one-shot and imported masks.
- ``"logits"``: learnable fp32 ``mask_logits [rows_local, in_local / 4, 6]`` (mask learning). In
  training the mask is a Gumbel-softmax soft mask (or a straight-through hard one), drawn and
  applied by :mod:`megatron.sparse.sampling` (fused CPU kernels, PyTorch elsewhere).

In eval (and always for ``"fixed"``) the mask is the chosen candidate, cached until the stored
tensor changes. Mask tensors shard with their weight's TP axis. Weights are frozen unless
``trainable_weights=True``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron.sparse import mask as mask_ops
from megatron.sparse import sampling
from megatron.sparse.sampling import MaskSample, NoiseIndex


@dataclass
class MaskState:
    """How a sparse layer draws its mask; shared by all layers of a model and set by the trainer."""

    tau: float = 4.0
    """Gumbel-softmax temperature."""
    kappa: float = 100.0
    """Logit scaling applied before adding Gumbel noise."""
    hard: bool = False
    """Straight-through hard masks in training instead of soft ones."""
    enabled: bool = True
    """False multiplies by a mask of ones (the dense layer)."""
    noise: bool = True
    """Add Gumbel noise when sampling; False gives the deterministic ``softmax(kappa l / tau)``."""
    straight_through: bool = False
    """Fixed masks in training pass the gradient of ``W~ = M * W`` to every weight, pruned ones
    included (adaptive sparse training); False gives ``dL/dW = M * dL/dW~``."""
    noise_seed: int | None = None
    """Seed of the next training forward's noise, mixed with each layer's ``noise_stream``. The
    trainer sets it per (step, global micro batch), so that the sampled masks do not depend on
    TP, DP or micro-batching and a recomputed forward draws the same noise. None draws a fresh
    seed from torch's default generator at every forward."""


MASK_KINDS = ("dense", "fixed", "logits")
MASK_TENSORS = {"fixed": "mask_choice", "logits": "mask_logits"}
"""The state-dict name of each stored mask kind's tensor."""


def is_mask_key(key: str) -> bool:
    """Whether a state-dict key names a sparse layer's mask tensor (of any kind)."""
    return any(key.endswith("." + name) or key == name for name in MASK_TENSORS.values())


def check_mask_kind(kind: str) -> None:
    """One-line ValueError for an unknown mask kind."""
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; choose one of {', '.join(MASK_KINDS)}")


def _tp_size(tp_group) -> int:
    if tp_group is not None:
        return tp_group.size()
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_world_size()
    return 1


class SparseMaskMixin:
    """The mask (dense, fixed or learnable logits) and the masked forward of both parallel layers."""

    mask_partition_dim: int  # mask axis sharded by TP (0: output rows, 1: input groups)

    def _init_mask(self, *, trainable_weights: bool, mask_state: MaskState | None,
                   mask_kind: str) -> None:
        check_mask_kind(mask_kind)
        rows, cols = self.weight.shape
        mask_ops.check_groupable(cols, f"{type(self).__name__} local input")
        self.mask_state = mask_state if mask_state is not None else MaskState()
        self.mask_kind = "dense"
        self.weight.requires_grad_(trainable_weights)
        if self.bias is not None:
            self.bias.requires_grad_(trainable_weights)
        self.noise_index: NoiseIndex | None = None
        self.noise_stream = 0  # set per layer by the model builder (a hash of the layer's name)
        self._eval_cache: tuple | None = None
        self._staged_masks: dict[str, torch.Tensor] = {}  # see staged_masks()
        self.last_sample: MaskSample | None = None
        self._last_sq_norm: torch.Tensor | None = None  # the fused forward's regulariser
        self.slorb: torch.nn.Module | None = None  # side branch, see megatron.sparse.slorb
        if mask_kind == "logits":
            logits = torch.nn.Parameter(torch.empty(self.mask_shape("logits"),
                                                    dtype=torch.float32, device=self.weight.device))
            torch.nn.init.normal_(logits, mean=0.0, std=mask_ops.LOGITS_INIT_STD)
            set_tensor_model_parallel_attributes(logits, True, self.mask_partition_dim, 1)
            self.mask_logits = logits
            self.mask_kind = "logits"
            self.noise_index = self._default_noise_index()
        elif mask_kind == "fixed":
            self._set_choice(torch.zeros(self.mask_shape("fixed"), dtype=torch.uint8,
                                         device=self.weight.device))

    def mask_shape(self, kind: str) -> tuple[int, ...]:
        """Local shape of the mask tensor of ``kind`` (``"fixed"`` or ``"logits"``)."""
        rows, cols = self.weight.shape
        groups = cols // mask_ops.GROUP_SIZE
        return (rows, groups, mask_ops.NUM_CANDIDATES) if kind == "logits" else (rows, groups)

    def _default_noise_index(self) -> NoiseIndex:
        """Local logits placed in the unsharded layer along this layer's TP axis."""
        rows, groups = self.mask_shape("fixed")
        rank, size = get_pg_rank(self.tp_group), get_pg_size(self.tp_group)
        if self.mask_partition_dim == 0:
            return NoiseIndex.contiguous(rows, groups, row_offset=rank * rows,
                                         device=self.weight.device)
        return NoiseIndex.contiguous(rows, groups, group_offset=rank * groups,
                                     total_groups=groups * size, device=self.weight.device)

    def _set_choice(self, choice: torch.Tensor) -> None:
        """Make this a ``"fixed"`` layer holding ``choice`` (dropping logits it had)."""
        if self.mask_kind == "logits":
            del self.mask_logits
            self.noise_index = None
        if self.mask_kind == "fixed":
            self.mask_choice.copy_(choice)
            return
        self.register_buffer("mask_choice", choice.to(torch.uint8).contiguous(), persistent=True)
        set_tensor_model_parallel_attributes(self.mask_choice, True, self.mask_partition_dim, 1)
        self.mask_kind = "fixed"

    # -- masks ---------------------------------------------------------------------------------
    def mask_choices(self) -> torch.Tensor:
        """uint8 ``[rows, in/4]`` candidate index of each group (the argmax for logits)."""
        if self.mask_kind == "fixed":
            return self.mask_choice
        if self.mask_kind == "logits":
            return mask_ops.argmax_candidates(self.mask_logits.detach()).to(torch.uint8)
        raise ValueError(f"{type(self).__name__} has no mask (mask_kind 'dense')")

    @torch.no_grad()
    def set_mask_choice(self, choice: torch.Tensor) -> None:
        """Fix the mask to the given uint8 ``[rows, in/4]`` candidates (any kind becomes fixed)."""
        if tuple(choice.shape) != self.mask_shape("fixed"):
            raise ValueError(f"mask choice shape {tuple(choice.shape)} does not match the layer's "
                             f"{self.mask_shape('fixed')}")
        if choice.numel() and int(choice.max()) >= mask_ops.NUM_CANDIDATES:
            raise ValueError(f"mask choices must lie in 0..{mask_ops.NUM_CANDIDATES - 1}")
        self._set_choice(choice.to(device=self.weight.device, dtype=torch.uint8))

    @torch.no_grad()
    def freeze_mask(self) -> None:
        """Replace learnable logits by their argmax (a ``"fixed"`` layer); others are kept."""
        if self.mask_kind == "logits":
            self._set_choice(self.mask_choices())

    def eval_mask(self) -> torch.Tensor:
        """Boolean ``[rows, in]`` mask of the chosen candidates, recomputed only on a change."""
        source = self.mask_choice if self.mask_kind == "fixed" else None
        if self.mask_kind == "logits":
            source = self.mask_logits
        if source is None:
            raise ValueError(f"{type(self).__name__} has no mask (mask_kind 'dense')")
        key = (self.mask_kind, source._version, source.data_ptr())
        if self._eval_cache is None or self._eval_cache[0] != key:
            self._eval_cache = (key, mask_ops.candidates_to_mask(self.mask_choices()))
        return self._eval_cache[1]

    def drop_mask_cache(self) -> None:
        """Free the cached boolean mask (rebuilt on the next masked forward)."""
        self._eval_cache = None

    def draw_sample(self) -> MaskSample:
        """The sample of the next training forward: its noise seed and the current state.

        The seed is ``mask_state.noise_seed`` mixed with this layer's ``noise_stream``, or a fresh
        draw from torch's default generator when no noise seed is set. Noise depends on the seed
        and the unsharded position only, so every TP layout samples the same mask.
        """
        state = self.mask_state
        if not state.noise:
            seed = 0
        elif state.noise_seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        else:
            seed = mask_ops.combine_seeds(state.noise_seed, self.noise_stream)
        return MaskSample(seed=seed, tau=state.tau, kappa=state.kappa, hard=state.hard,
                          noise=state.noise)

    def masked_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight * mask``: a fresh Gumbel-softmax sample when training logits, else the
        chosen (fixed or argmax) mask; the plain weight for ``"dense"`` or a disabled mask."""
        if not self.mask_state.enabled or self.mask_kind == "dense":
            return weight
        if not (self.training and self.mask_kind == "logits"):
            if self.training and self.mask_state.straight_through:
                return mask_ops.straight_through_masked(weight, self.eval_mask())
            return weight * self.eval_mask().to(weight.dtype)
        self.last_sample = self.draw_sample()
        masked, self._last_sq_norm = sampling.masked_weight(weight, self.mask_logits,
                                                            self.noise_index, self.last_sample)
        return masked

    def sparse_weight_norm_sq(self) -> torch.Tensor:
        """Local regulariser term ``||sg(W) * M_soft||^2`` for the mask of the last forward.

        On the fused CPU path this is the forward's own output (part of its graph: backpropagate
        it in the same ``backward`` call as the loss); elsewhere it is recomputed.
        """
        if self.mask_kind != "logits" or self.last_sample is None:
            raise RuntimeError("sparse_weight_norm_sq needs a training forward of mask logits")
        if self._last_sq_norm is not None:
            return self._last_sq_norm
        return sampling.masked_weight_sq_norm(self.weight, self.mask_logits, self.noise_index,
                                              self.last_sample)

    @torch.no_grad()
    def set_mask_prior(self, prior_mask: torch.Tensor, strength: float) -> None:
        """Shift the logits toward a boolean 2:4 prior mask of the local weight's shape."""
        if self.mask_kind != "logits":
            raise ValueError(f"a mask prior needs mask logits; this layer's mask is "
                             f"{self.mask_kind!r}")
        if tuple(prior_mask.shape) != tuple(self.weight.shape):
            raise ValueError(f"prior mask shape {tuple(prior_mask.shape)} does not match the local "
                             f"weight {tuple(self.weight.shape)}")
        groups = mask_ops.weight_to_groups(prior_mask.bool())
        self.mask_logits.copy_(mask_ops.prior_logits(self.mask_logits, groups, strength))

    # -- megatron hooks ------------------------------------------------------------------------
    def _forward_impl(self, input, weight, *args, **kwargs):
        output = super()._forward_impl(input, self.masked_weight(weight), *args, **kwargs)
        if self.slorb is not None:  # on the local (pre-reduce) output
            output = output + self.slorb(input, **kwargs)
        return output

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Like the parent's, with the mask tensor sharded along the weight's TP axis."""
        state_dict = {**self.state_dict(prefix="", keep_vars=True), **self._staged_masks}
        axis_map = {"weight": self.weight_partition_dim,
                    **{name: self.mask_partition_dim for name in MASK_TENSORS.values()}}
        if self.weight_partition_dim == 0:
            axis_map["bias"] = 0
        if self.slorb is not None:
            axis_map.update(self.slorb.axis_map("slorb."))
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, axis_map, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=(metadata or {}).get("dp_cp_group"),
        )


class SparseColumnParallelLinear(SparseMaskMixin, ColumnParallelLinear):
    """ColumnParallelLinear with a 2:4 mask; the mask is sharded with the output rows."""

    mask_partition_dim = 0
    weight_partition_dim = 0

    def __init__(self, input_size: int, output_size: int, *, trainable_weights: bool = False,
                 mask_state: MaskState | None = None, mask_kind: str = "logits",
                 **kwargs):
        mask_ops.check_groupable(input_size, "SparseColumnParallelLinear input")
        super().__init__(input_size, output_size, **kwargs)
        self._init_mask(trainable_weights=trainable_weights, mask_state=mask_state,
                        mask_kind=mask_kind)


class SparseRowParallelLinear(SparseMaskMixin, RowParallelLinear):
    """RowParallelLinear with a 2:4 mask; the mask is sharded with the input columns."""

    mask_partition_dim = 1
    weight_partition_dim = 1

    def __init__(self, input_size: int, output_size: int, *, trainable_weights: bool = False,
                 mask_state: MaskState | None = None, mask_kind: str = "logits",
                 **kwargs):
        tp = _tp_size(kwargs.get("tp_group"))
        if input_size % tp != 0:
            raise ValueError(f"SparseRowParallelLinear: input dimension {input_size} is not "
                             f"divisible by the tensor-parallel size {tp}")
        mask_ops.check_groupable(input_size // tp,
                                 f"SparseRowParallelLinear input per TP rank ({input_size}/{tp})")
        super().__init__(input_size, output_size, **kwargs)
        self._init_mask(trainable_weights=trainable_weights, mask_state=mask_state,
                        mask_kind=mask_kind)


def sparse_layers(module: torch.nn.Module) -> list[tuple[str, SparseMaskMixin]]:
    """All sparse linear layers of a model, as ``(name, layer)`` pairs."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, SparseMaskMixin)]


def set_mask_state(module: torch.nn.Module, **fields) -> None:
    """Set :class:`MaskState` fields (tau, kappa, hard, enabled) on every sparse layer."""
    for _, layer in sparse_layers(module):
        for name, value in fields.items():
            if not hasattr(layer.mask_state, name):
                raise AttributeError(f"MaskState has no field {name!r}")
            setattr(layer.mask_state, name, value)


def mask_kind_of(module: torch.nn.Module) -> str:
    """The mask kind shared by a model's sparse layers (``"dense"`` when it has none)."""
    kinds = {layer.mask_kind for _, layer in sparse_layers(module)}
    if len(kinds) > 1:
        raise ValueError(f"the model mixes mask kinds {sorted(kinds)}; a checkpoint stores one")
    return kinds.pop() if kinds else "dense"


@contextmanager
def staged_masks(module: torch.nn.Module, kind: str) -> Iterator[dict[str, torch.Tensor]]:
    """Give every sparse layer an empty mask tensor of ``kind`` in its sharded state dict only,
    to read a checkpoint's masks of that kind without replacing the layer's own.

    Yields ``{layer name: staged tensor}``.
    """
    tensor_name = MASK_TENSORS[kind]
    chosen = sparse_layers(module)
    staged = {}
    try:
        for name, layer in chosen:
            dtype = torch.float32 if kind == "logits" else torch.uint8
            staged[name] = torch.empty(layer.mask_shape(kind), dtype=dtype,
                                       device=layer.weight.device)
            layer._staged_masks = {tensor_name: staged[name]}
        yield staged
    finally:
        for _, layer in chosen:
            layer._staged_masks = {}
