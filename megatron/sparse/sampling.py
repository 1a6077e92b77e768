"""The training mask of one forward: a Gumbel-softmax sample applied to the weight.

A sample is fixed by :class:`MaskSample` (a seed drawn from torch's generator, tau, kappa, hard,
noise) and the layer's :class:`NoiseIndex`. The Gumbel noise is counter-based (a hash of the seed
and the logit's position in the *unsharded* layer), so

* every tensor-parallel layout samples exactly the noise of the unsharded layer;
* the backward pass recomputes the sample instead of storing noise, probabilities or mask.

On CPU float32 the fused kernels of :mod:`megatron.sparse.cpu_kernels` do the forward (masked
weight and regulariser together) and the backward in one pass each; elsewhere (GPU, other dtypes,
no C compiler) the same formulas run as PyTorch ops (:func:`torch_masked_weight`), which also
serve as the reference in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.sparse import cpu_kernels
from megatron.sparse import mask as mask_ops


@dataclass(frozen=True)
class MaskSample:
    """Everything that fixes one training mask of a layer."""

    seed: int
    """Noise seed, drawn from torch's default generator at each training forward."""
    tau: float
    """Gumbel-softmax temperature."""
    kappa: float
    """Logit scaling."""
    hard: bool = False
    """Straight-through one-hot masks (soft-mask gradient)."""
    noise: bool = True
    """False: the deterministic ``softmax(kappa * logits / tau)``."""


@dataclass(frozen=True)
class NoiseIndex:
    """Where a layer's local logits sit in the unsharded layer (for the counter-based noise)."""

    row_ids: torch.Tensor
    """int32 ``[rows_local]``: the unsharded row of each local row."""
    group_offset: int = 0
    """First unsharded group of the local groups (row-parallel shards)."""
    total_groups: int = 0
    """Groups per row of the unsharded layer."""

    @classmethod
    def contiguous(cls, rows: int, groups: int, *, row_offset: int = 0, group_offset: int = 0,
                   total_groups: int | None = None, device=None) -> "NoiseIndex":
        """Local rows ``row_offset ..`` and groups ``group_offset ..`` of the unsharded layer."""
        row_ids = torch.arange(row_offset, row_offset + rows, dtype=torch.int32, device=device)
        return cls(row_ids, group_offset, groups if total_groups is None else total_groups)

    def logit_counters(self, groups: int, device=None) -> torch.Tensor:
        """``[rows, groups, 6]`` counters of the local logits (see :func:`mask.noise_index`)."""
        return mask_ops.noise_index(self.row_ids.to(device), groups,
                                    group_offset=self.group_offset,
                                    total_groups=self.total_groups)


def sample_noise(logits: torch.Tensor, index: NoiseIndex, sample: MaskSample) -> torch.Tensor | None:
    """The ``[rows, groups, 6]`` Gumbel noise of a sample (None without noise)."""
    if not sample.noise:
        return None
    counters = index.logit_counters(logits.shape[1], logits.device)
    return mask_ops.gumbel_noise(sample.seed, counters)


def torch_mask_groups(logits: torch.Tensor, index: NoiseIndex,
                      sample: MaskSample) -> torch.Tensor:
    """Differentiable ``[rows, groups, 4]`` mask of a sample, in PyTorch ops."""
    return mask_ops.soft_mask(logits, tau=sample.tau, kappa=sample.kappa, hard=sample.hard,
                              noise=sample_noise(logits, index, sample))


def torch_masked_weight(weight: torch.Tensor, logits: torch.Tensor, index: NoiseIndex,
                        sample: MaskSample) -> torch.Tensor:
    """``weight * mask`` in PyTorch ops (GPU path and reference)."""
    groups = torch_mask_groups(logits, index, sample)
    return weight * mask_ops.groups_to_weight(groups).to(weight.dtype)


class _FusedMaskedWeight(torch.autograd.Function):
    """``(weight * mask, ||sg(weight) * mask||^2)`` in one CPU kernel pass; the backward
    recomputes the sample and differentiates both outputs in one pass too."""

    @staticmethod
    def forward(ctx, weight, logits, index, sample):
        ctx.save_for_backward(weight, logits)
        ctx.index, ctx.sample = index, sample
        ctx.set_materialize_grads(False)
        return cpu_kernels.forward(weight.detach(), logits.detach(), index, sample)

    @staticmethod
    def backward(ctx, grad_out, grad_sq_norm):
        weight, logits = ctx.saved_tensors
        reg_scale = 0.0 if grad_sq_norm is None else 2.0 * float(grad_sq_norm)
        if grad_out is None and reg_scale == 0.0:
            return None, None, None, None
        grad_weight, grad_logits = cpu_kernels.backward(
            weight, logits, ctx.index, ctx.sample, grad_out=grad_out, reg_scale=reg_scale,
            need_weight_grad=ctx.needs_input_grad[0])
        return grad_weight, grad_logits, None, None


def _fused(weight: torch.Tensor, logits: torch.Tensor) -> bool:
    return cpu_kernels.supports(weight, logits)


def masked_weight(weight: torch.Tensor, logits: torch.Tensor, index: NoiseIndex,
                  sample: MaskSample) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight * mask, ||sg(weight) * mask||^2)`` for one sample, differentiable in the logits
    (and a trainable weight; the regulariser's gradient flows into the logits only).

    The fused CPU kernel returns the regulariser from the forward pass, so its gradient joins the
    masked weight's in one backward pass. The PyTorch path returns None for it:
    :func:`masked_weight_sq_norm` recomputes it on demand, so that no mask stays alive for it.
    """
    if _fused(weight, logits):
        return _FusedMaskedWeight.apply(weight, logits, index, sample)
    return torch_masked_weight(weight, logits, index, sample), None


def masked_weight_sq_norm(weight: torch.Tensor, logits: torch.Tensor, index: NoiseIndex,
                          sample: MaskSample) -> torch.Tensor:
    """Regulariser ``||sg(W) * M||^2`` of one sample, recomputed in PyTorch ops."""
    return mask_ops.sparse_weight_norm_sq(weight, torch_mask_groups(logits, index, sample))
