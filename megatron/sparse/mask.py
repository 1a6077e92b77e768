"""2:4 mask math: the candidate set, Gumbel-softmax sampling, hard masks, priors, regulariser.

Shapes: mask logits are ``[rows, groups, 6]`` where a group is 4 consecutive input columns of one
output row of the weight (``groups = in_features / 4``). ``logits.view(-1, 6)`` is the
``[numel / 4, 6]`` layout of the MaskLLM paper. Masks come back as ``[rows, groups, 4]`` and are
reshaped to the weight's ``[rows, in_features]`` by :func:`groups_to_weight`.
"""

from __future__ import annotations

import torch

GROUP_SIZE = 4
NUM_CANDIDATES = 6
LOGITS_INIT_STD = 0.01
GUMBEL_EPS = 1e-10

# The 6 ways of keeping 2 of 4, in the fixed order 1100, 1010, 1001, 0110, 0101, 0011.
_CANDIDATE_ROWS = (
    (1, 1, 0, 0),
    (1, 0, 1, 0),
    (1, 0, 0, 1),
    (0, 1, 1, 0),
    (0, 1, 0, 1),
    (0, 0, 1, 1),
)


def candidate_matrix(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The ``[6, 4]`` matrix S whose row k is candidate k (1 = kept)."""
    return torch.tensor(_CANDIDATE_ROWS, dtype=dtype, device=device)


def check_groupable(in_features: int, what: str = "layer") -> None:
    """Raise a one-line ValueError unless ``in_features`` splits into groups of 4."""
    if in_features % GROUP_SIZE != 0:
        raise ValueError(
            f"{what}: input dimension {in_features} is not divisible by {GROUP_SIZE}; 2:4 sparsity "
            f"needs groups of 4 input columns (choose a size or TP degree that keeps it divisible)"
        )


def weight_to_groups(weight: torch.Tensor) -> torch.Tensor:
    """View a ``[rows, in]`` tensor as ``[rows, in/4, 4]``."""
    rows, cols = weight.shape
    check_groupable(cols, "weight")
    return weight.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)


def groups_to_weight(groups: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_to_groups`: ``[rows, g, 4]`` -> ``[rows, 4 g]``."""
    return groups.reshape(groups.shape[0], -1)


_MASK32 = 0xFFFFFFFF
# The two odd multipliers of the "lowbias32" integer hash, the second as its negative 32-bit
# equivalent so that int64 products never overflow (only the low 32 bits are kept).
_MIX_MULTIPLIERS = (0x7FEB352D, 0x846CA68B - (1 << 32))


def _mix32(x):
    """Bijective 32-bit integer hash of values in ``[0, 2^32)`` (Python ints or int64 tensors)."""
    x = x ^ (x >> 16)
    x = (x * _MIX_MULTIPLIERS[0]) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MIX_MULTIPLIERS[1]) & _MASK32
    return x ^ (x >> 16)


def counter_uniform(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform ``(0, 1)`` float32 samples, a pure function of ``(seed, index)`` (23-bit grid).

    ``index`` holds non-negative integers (taken modulo 2^32). The same hash runs in the fused
    CPU kernel (``csrc/mask_kernels.c``), so both paths draw bit-identical uniforms.
    """
    seed = int(seed) & _MASK32
    h = _mix32(((_mix32((index.long() & _MASK32) ^ seed)) + seed) & _MASK32)
    return ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))


def combine_seeds(*values: int) -> int:
    """A 31-bit seed that depends on every value (e.g. run seed, step, micro batch, layer)."""
    h = 0x2545F491
    for v in values:
        h = _mix32(((h ^ (int(v) & _MASK32)) + 0x9E3779B9) & _MASK32)
    return h & 0x7FFFFFFF


def noise_index(row_ids: torch.Tensor, groups: int, *, group_offset: int = 0,
                total_groups: int | None = None) -> torch.Tensor:
    """``[rows, groups, 6]`` counter of each logit in the unsharded layer's row-major order.

    ``row_ids`` are the unsharded rows of the local rows; ``group_offset`` / ``total_groups``
    place the local groups among the unsharded ones (row-parallel shards).
    """
    total = groups if total_groups is None else total_groups
    device = row_ids.device
    group = torch.arange(groups, device=device) + group_offset
    base = row_ids.long().view(-1, 1) * total + group.view(1, -1)
    return base.unsqueeze(-1) * NUM_CANDIDATES + torch.arange(NUM_CANDIDATES, device=device)


def gumbel_noise(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel(0, 1) samples ``-log(-log(u))`` with ``u = counter_uniform(seed, index)``.

    ``u`` lies strictly inside (0, 1) on a grid where ``-log(u)`` is positive in float32; the
    clamp (also in the C kernel) only guards against a math library rounding it to 0.
    """
    return counter_uniform(seed, index).log_().neg_().clamp_min_(GUMBEL_EPS).log_().neg_()


class _SoftMask(torch.autograd.Function):
    """``softmax((kappa l + g) / tau) @ S`` with an analytic backward.

    Saves only the probabilities and works in place: about 3x less time and memory than autograd
    through ``torch.softmax`` (whose CPU kernel is slow on a last dimension of 6).
    """

    @staticmethod
    def forward(ctx, logits, noise, tau: float, kappa: float, hard: bool):
        z = logits.detach().float() * (kappa / tau)
        if noise is not None:
            z.add_(noise, alpha=1.0 / tau)
        z.sub_(z.amax(dim=-1, keepdim=True)).exp_()
        probs = z.div_(z.sum(dim=-1, keepdim=True))
        ctx.save_for_backward(probs)
        ctx.scale = kappa / tau
        table = candidate_matrix(probs.dtype, probs.device)
        if hard:
            return table[probs.argmax(dim=-1)]
        return probs @ table

    @staticmethod
    def backward(ctx, grad_mask):
        (probs,) = ctx.saved_tensors
        grad_p = grad_mask.float() @ candidate_matrix(probs.dtype, probs.device).t()
        grad_p.sub_((grad_p * probs).sum(dim=-1, keepdim=True)).mul_(probs).mul_(ctx.scale)
        return grad_p, None, None, None, None


class _StraightThroughMask(torch.autograd.Function):
    """``weight * mask`` forward; the gradient passes to every weight, pruned ones included."""

    @staticmethod
    def forward(ctx, weight, mask):
        return weight * mask

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, None


def straight_through_masked(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight * mask`` whose backward is the identity in ``weight`` (AST's straight-through
    estimator: ``dL/dW = dL/dW~`` for ``W~ = M * W``, so pruned weights keep learning)."""
    return _StraightThroughMask.apply(weight, mask.to(weight.dtype))


def soft_mask(logits: torch.Tensor, *, tau: float, kappa: float, hard: bool = False,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable ``[rows, g, 4]`` mask ``p @ S``.

    ``hard`` returns the one-hot (argmax) candidate in the forward pass and the soft mask's
    gradient in the backward pass (straight-through estimator).
    """
    return _SoftMask.apply(logits, noise, float(tau), float(kappa), bool(hard))


def argmax_candidates(logits: torch.Tensor) -> torch.Tensor:
    """Index (0..5) of the most likely candidate of each group."""
    return logits.argmax(dim=-1)


def hard_mask(logits: torch.Tensor) -> torch.Tensor:
    """Boolean ``[rows, g, 4]`` eval mask: the argmax candidate of each group."""
    return candidate_matrix(torch.bool, logits.device)[argmax_candidates(logits)]


def candidates_to_mask(choice: torch.Tensor) -> torch.Tensor:
    """Boolean ``[rows, 4 g]`` mask of per-group candidate indices ``[rows, g]`` (0..5)."""
    return groups_to_weight(candidate_matrix(torch.bool, choice.device)[choice.long()])


def candidate_overlap(mask_groups: torch.Tensor) -> torch.Tensor:
    """``[rows, g, 6]``: how many kept positions each candidate shares with a boolean 2:4 mask."""
    return mask_groups.float() @ candidate_matrix(torch.float32, mask_groups.device).t()


def is_two_four(mask: torch.Tensor) -> bool:
    """True if every group of 4 consecutive entries along the last dim keeps exactly 2."""
    if mask.shape[-1] % GROUP_SIZE != 0:
        return False
    counts = mask.reshape(*mask.shape[:-1], -1, GROUP_SIZE).sum(dim=-1)
    return bool((counts == 2).all())


def mask_to_candidates(mask_groups: torch.Tensor) -> torch.Tensor:
    """Candidate index of each group of an exactly-2:4 boolean ``[rows, g, 4]`` mask."""
    if not is_two_four(groups_to_weight(mask_groups)):
        raise ValueError("mask is not 2:4: every group of 4 input columns must keep exactly 2")
    return candidate_overlap(mask_groups).argmax(dim=-1)


def prior_logits(logits: torch.Tensor, prior_mask_groups: torch.Tensor,
                 strength: float) -> torch.Tensor:
    """``logits + strength * std(logits) * (overlap - 1)`` for a 2:4 prior mask (DESIGN: Prior).

    ``std`` is that of the given logits; for constant logits (std 0) the init std 0.01 is used so
    that a prior still takes effect.
    """
    if not is_two_four(groups_to_weight(prior_mask_groups)):
        raise ValueError("prior mask is not 2:4: every group of 4 input columns must keep exactly 2")
    std = logits.float().std()
    if not torch.isfinite(std) or float(std) == 0.0:
        std = torch.tensor(LOGITS_INIT_STD)
    overlap = candidate_overlap(prior_mask_groups.to(logits.device))
    return logits + strength * std.to(logits.device) * (overlap - 1.0)


def sparse_weight_norm_sq(weight: torch.Tensor, mask_groups: torch.Tensor) -> torch.Tensor:
    """Regulariser term ``||sg(W) * M||^2`` (weights detached, gradient flows into the mask)."""
    masked = weight_to_groups(weight.detach()).float() * mask_groups
    return (masked * masked).sum()
