"""SparseGPT 2:4 pruning (Frantar & Alistarh, 2023) for one weight matrix.

Given the layer Hessian ``H = 2/n sum_t x_t x_t^T`` of its calibration inputs, columns are
processed left to right in blocks of ``block_size``. At the first column of each group of 4 the
two entries of every row with the smallest saliency ``w^2 / [H^-1]_jj^2`` are pruned, where
``H^-1`` is represented by its upper Cholesky factor (as in the paper's reference algorithm).
Each column's pruning error is propagated to the not yet processed columns (OBS update), so later
mask choices see the compensated weights. The compensated weights are returned only when asked
for; the mask is the same either way.

Dead inputs (``H_jj == 0``, never active in calibration) get ``H_jj = 1`` and zero weights in the
internal copy, so they are pruned first; damping adds ``percdamp * mean(diag H)`` to the diagonal.
"""

from __future__ import annotations

import torch

from megatron.sparse.prune.common import GROUP, KEEP, check_weight


def inverse_hessian_factor(hessian: torch.Tensor, *, percdamp: float = 0.01) -> tuple[
        torch.Tensor, torch.Tensor]:
    """``(U, dead)``: upper Cholesky factor of ``(H + damp I)^-1`` and the dead-input flags."""
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    diag = torch.arange(H.shape[0], device=H.device)
    H[diag, diag] += percdamp * torch.mean(torch.diag(H))
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError("SparseGPT: the damped Hessian is not positive definite; raise the "
                         "dampening (percdamp) or use more calibration data")
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True), dead


def sparsegpt_prune(*, weight: torch.Tensor, hessian: torch.Tensor, update_weight: bool = False,
                    block_size: int = 128, percdamp: float = 0.01) -> tuple[torch.Tensor,
                                                                            torch.Tensor | None]:
    """2:4-prune ``weight`` ``[rows, in]`` with the ``[in, in]`` Hessian of its inputs.

    Returns ``(mask, new_weight)``: the boolean mask (True = kept) and, with ``update_weight``,
    the OBS-compensated weight (pruned entries zero, dtype of ``weight``), else None. Computation
    runs in float64 for float64 inputs and in float32 otherwise.
    """
    check_weight(weight)
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols}) "
                         f"for a weight of shape {tuple(weight.shape)}")
    if block_size % GROUP != 0 or block_size <= 0:
        raise ValueError(f"block_size {block_size} must be a positive multiple of {GROUP}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()
    U, dead = inverse_hessian_factor(hessian.to(device=W.device, dtype=dtype), percdamp=percdamp)
    W[:, dead] = 0
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W1 = W[:, start:end].clone()
        U1 = U[start:end, start:end]
        d1 = torch.diag(U1)
        err1 = torch.empty_like(W1)
        for g in range(0, end - start, GROUP):
            # the mask of a group is chosen on the weights compensated for all earlier columns
            saliency = W1[:, g:g + GROUP] ** 2 / d1[g:g + GROUP].unsqueeze(0) ** 2
            drop = torch.sort(saliency, dim=1, stable=True).indices[:, :GROUP - KEEP]
            cut = torch.zeros(rows, GROUP, dtype=torch.bool, device=W.device).scatter_(1, drop,
                                                                                       True)
            pruned[:, start + g:start + g + GROUP] = cut
            scale = cut.to(dtype) / d1[g:g + GROUP].unsqueeze(0)  # err = (w - q) / d
            # OBS steps inside the group column by column; the rest of the block at once
            for k in range(GROUP):
                i = g + k
                torch.mul(W1[:, i], scale[:, k], out=err1[:, i])
                if k + 1 < GROUP:
                    W1[:, i + 1:g + GROUP].addr_(err1[:, i], U1[i, i + 1:g + GROUP], alpha=-1)
            if g + GROUP < end - start:
                W1[:, g + GROUP:].addmm_(err1[:, g:g + GROUP], U1[g:g + GROUP, g + GROUP:],
                                         alpha=-1)
        W[:, start:end] = W1.masked_fill_(pruned[:, start:end], 0)
        if end < cols:
            W[:, end:].addmm_(err1, U[start:end, end:], alpha=-1)
    mask = ~pruned
    if not update_weight:
        return mask, None
    return mask, W.to(weight.dtype)
