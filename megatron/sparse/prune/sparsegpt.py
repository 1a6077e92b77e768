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
        err1 = torch.zeros_like(W1)
        for i in range(end - start):
            if i % GROUP == 0:
                saliency = W1[:, i:i + GROUP] ** 2 / d1[i:i + GROUP].unsqueeze(0) ** 2
                drop = torch.sort(saliency, dim=1, stable=True).indices[:, :GROUP - KEEP]
                pruned[:, start + i:start + i + GROUP].scatter_(1, drop, True)
            w = W1[:, i]
            q = torch.where(pruned[:, start + i], torch.zeros_like(w), w)
            err = (w - q) / d1[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            err1[:, i] = err
            W1[:, i] = q
        W[:, start:end] = W1
        W[:, end:] -= err1 @ U[start:end, end:]
    mask = ~pruned
    if not update_weight:
        return mask, None
    return mask, W.to(weight.dtype)
