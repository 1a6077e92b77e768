"""AdamW with the annealed SR-STE decay of adaptive sparse training (AST).

For a sparse linear's weight ``W`` with boolean kept mask ``M`` and decay ``lambda_t``, step
``t`` (1-based), loss gradient ``g_t`` (after clipping), the two modes are:

``"adam"`` (the paper's; thu-ml/Adaptive-Sparse-Trainer ``adamw.py`` at 723d742)::

    W   <- W * (1 - lr * wd)
    m_t  = b1 m_{t-1} + (1 - b1) g_t                 first moment: the loss gradient only
    u_t  = m_t + lambda_t * (~M * W)                 the decay joins after the average
    v_t  = b2 v_{t-1} + (1 - b2) u_t^2               second moment: of u_t (not of g_t)
    W   <- W - lr / (1 - b1^t) * u_t / (sqrt(v_t / (1 - b2^t)) + eps)

so the decay is not smoothed by beta1 (it acts on the current pruned weights at full strength
every step) but does enter the normaliser. ``"gradient"`` (the paper's LLaMA code, which adds
the decay to the gradient before a decoupled AdamW): plain AdamW on ``g_t + lambda_t (~M * W)``.
Every other parameter (embeddings, norms, the output layer) gets plain AdamW in both modes. The
masks are boolean: the public GPT-2 code applies ``~`` to an int mask (bitwise NOT: -2 / -1),
which turns the decay into growth of every weight; this does not.
"""

from __future__ import annotations

from typing import Callable

import torch

SRSTE_MODES = ("adam", "gradient")


@torch.no_grad()
def adamw_srste_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                       exp_avg_sq: torch.Tensor, *, step: int, lr: float,
                       betas: tuple[float, float], eps: float, weight_decay: float,
                       decay: float = 0.0, pruned: torch.Tensor | None = None,
                       mode: str = "adam") -> None:
    """One in-place update of ``param`` and its moments (``step`` counts from 1).

    ``pruned`` is the boolean mask of the pruned entries (None: a dense parameter, plain AdamW).
    """
    beta1, beta2 = betas
    param.mul_(1.0 - lr * weight_decay)
    bias1 = 1.0 - beta1 ** step
    bias2_sqrt = (1.0 - beta2 ** step) ** 0.5
    if pruned is not None and mode == "gradient":
        grad = grad + decay * pruned.to(param.dtype) * param
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    if pruned is None or mode == "gradient":
        update = exp_avg
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    else:
        update = exp_avg + decay * pruned.to(param.dtype) * param
        exp_avg_sq.mul_(beta2).addcmul_(update, update, value=1.0 - beta2)
    denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
    param.addcdiv_(update, denom, value=-lr / bias1)


class SRSTEAdamW(torch.optim.Optimizer):
    """AdamW whose sparse weights get the SR-STE decay (see the module docstring).

    ``pruned_mask(param)`` returns the boolean pruned mask of a sparse weight, None for any other
    parameter; it is read at every step (the masks change at step boundaries). The decay of the
    step is each group's ``srste_decay`` (set by the schedule like ``lr``).
    """

    def __init__(self, params, *, pruned_mask: Callable[[torch.Tensor], torch.Tensor | None],
                 lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, mode: str = "adam"):
        if mode not in SRSTE_MODES:
            raise ValueError(f"unknown SR-STE mode {mode!r}; choose one of {', '.join(SRSTE_MODES)}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, srste_decay=0.0, mode=mode))
        self.pruned_mask = pruned_mask

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("SRSTEAdamW.step takes no closure")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                adamw_srste_update(
                    p, p.grad, state["exp_avg"], state["exp_avg_sq"], step=state["step"],
                    lr=group["lr"], betas=group["betas"], eps=group["eps"],
                    weight_decay=group["weight_decay"], decay=group["srste_decay"],
                    pruned=self.pruned_mask(p), mode=group["mode"])
