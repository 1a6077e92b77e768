"""Tensor-parallel linear layers whose weight is multiplied by a learnable 2:4 mask.

Each layer owns fp32 ``mask_logits`` of shape ``[rows_local, in_local / 4, 6]`` (one 6-way choice
per group of 4 input columns). In training the mask is a Gumbel-softmax soft mask (or a
straight-through hard one); in eval it is the argmax candidate, cached until the logits change.
Weights are frozen unless ``trainable_weights=True``. Training samples are drawn and applied by
:mod:`megatron.sparse.sampling` (fused CPU kernels, PyTorch elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    noise_seed: int | None = None
    """Seed of the next training forward's noise, mixed with each layer's ``noise_stream``. The
    trainer sets it per (step, global micro batch), so that the sampled masks do not depend on
    TP, DP or micro-batching and a recomputed forward draws the same noise. None draws a fresh
    seed from torch's default generator at every forward."""


def _tp_size(tp_group) -> int:
    if tp_group is not None:
        return tp_group.size()
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_world_size()
    return 1


class SparseMaskMixin:
    """Mask logits, mask sampling and the masked forward shared by both parallel layers."""

    mask_partition_dim: int  # logits axis sharded by TP (0: output rows, 1: input groups)

    def _init_mask(self, *, trainable_weights: bool, mask_state: MaskState | None) -> None:
        rows, cols = self.weight.shape
        mask_ops.check_groupable(cols, f"{type(self).__name__} local input")
        self.mask_state = mask_state if mask_state is not None else MaskState()
        self.mask_logits = torch.nn.Parameter(
            torch.empty(rows, cols // mask_ops.GROUP_SIZE, mask_ops.NUM_CANDIDATES,
                        dtype=torch.float32, device=self.weight.device))
        torch.nn.init.normal_(self.mask_logits, mean=0.0, std=mask_ops.LOGITS_INIT_STD)
        set_tensor_model_parallel_attributes(self.mask_logits, True, self.mask_partition_dim, 1)
        self.weight.requires_grad_(trainable_weights)
        if self.bias is not None:
            self.bias.requires_grad_(trainable_weights)
        self.noise_index = self._default_noise_index()
        self.noise_stream = 0  # set per layer by the model builder (a hash of the layer's name)
        self._eval_cache: tuple | None = None
        self.last_sample: MaskSample | None = None
        self._last_sq_norm: torch.Tensor | None = None  # the fused forward's regulariser

    def _default_noise_index(self) -> NoiseIndex:
        """Local logits placed in the unsharded layer along this layer's TP axis."""
        rows, groups, _ = self.mask_logits.shape
        rank, size = get_pg_rank(self.tp_group), get_pg_size(self.tp_group)
        if self.mask_partition_dim == 0:
            return NoiseIndex.contiguous(rows, groups, row_offset=rank * rows,
                                         device=self.weight.device)
        return NoiseIndex.contiguous(rows, groups, group_offset=rank * groups,
                                     total_groups=groups * size, device=self.weight.device)

    # -- masks ---------------------------------------------------------------------------------
    def eval_mask(self) -> torch.Tensor:
        """Boolean ``[rows, in]`` argmax mask, recomputed only when the logits changed."""
        key = (self.mask_logits._version, self.mask_logits.data_ptr())
        if self._eval_cache is None or self._eval_cache[0] != key:
            with torch.no_grad():
                groups = mask_ops.hard_mask(self.mask_logits)
            self._eval_cache = (key, mask_ops.groups_to_weight(groups))
        return self._eval_cache[1]

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
        """``weight * mask``: a fresh Gumbel-softmax sample in training, the argmax in eval."""
        if not self.mask_state.enabled:
            return weight
        if not self.training:
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
        if self.last_sample is None:
            raise RuntimeError("sparse_weight_norm_sq needs a training forward first")
        if self._last_sq_norm is not None:
            return self._last_sq_norm
        return sampling.masked_weight_sq_norm(self.weight, self.mask_logits, self.noise_index,
                                              self.last_sample)

    @torch.no_grad()
    def set_mask_prior(self, prior_mask: torch.Tensor, strength: float) -> None:
        """Shift the logits toward a boolean 2:4 prior mask of the local weight's shape."""
        if tuple(prior_mask.shape) != tuple(self.weight.shape):
            raise ValueError(f"prior mask shape {tuple(prior_mask.shape)} does not match the local "
                             f"weight {tuple(self.weight.shape)}")
        groups = mask_ops.weight_to_groups(prior_mask.bool())
        self.mask_logits.copy_(mask_ops.prior_logits(self.mask_logits, groups, strength))

    # -- megatron hooks ------------------------------------------------------------------------
    def _forward_impl(self, input, weight, *args, **kwargs):
        return super()._forward_impl(input, self.masked_weight(weight), *args, **kwargs)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Like the parent's, with ``mask_logits`` sharded along the weight's TP axis."""
        state_dict = self.state_dict(prefix="", keep_vars=True)
        axis_map = {"weight": self.weight_partition_dim, "mask_logits": self.mask_partition_dim}
        if self.weight_partition_dim == 0:
            axis_map["bias"] = 0
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, axis_map, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=(metadata or {}).get("dp_cp_group"),
        )


class SparseColumnParallelLinear(SparseMaskMixin, ColumnParallelLinear):
    """ColumnParallelLinear with a learnable 2:4 mask; logits sharded with the output rows."""

    mask_partition_dim = 0
    weight_partition_dim = 0

    def __init__(self, input_size: int, output_size: int, *, trainable_weights: bool = False,
                 mask_state: MaskState | None = None, **kwargs):
        mask_ops.check_groupable(input_size, "SparseColumnParallelLinear input")
        super().__init__(input_size, output_size, **kwargs)
        self._init_mask(trainable_weights=trainable_weights, mask_state=mask_state)


class SparseRowParallelLinear(SparseMaskMixin, RowParallelLinear):
    """RowParallelLinear with a learnable 2:4 mask; logits sharded with the input columns."""

    mask_partition_dim = 1
    weight_partition_dim = 1

    def __init__(self, input_size: int, output_size: int, *, trainable_weights: bool = False,
                 mask_state: MaskState | None = None, **kwargs):
        tp = _tp_size(kwargs.get("tp_group"))
        if input_size % tp != 0:
            raise ValueError(f"SparseRowParallelLinear: input dimension {input_size} is not "
                             f"divisible by the tensor-parallel size {tp}")
        mask_ops.check_groupable(input_size // tp,
                                 f"SparseRowParallelLinear input per TP rank ({input_size}/{tp})")
        super().__init__(input_size, output_size, **kwargs)
        self._init_mask(trainable_weights=trainable_weights, mask_state=mask_state)


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
