"""Megatron-side perplexity: exp(mean token cross entropy) over non-overlapping windows.

Works at any TP size: ``model_forward`` with labels returns the vocab-parallel cross entropy,
identical on every TP rank. Sparse layers apply their eval (argmax) masks; call
``set_mask_state(model, enabled=False)`` first for the dense model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron.sparse.model import model_forward


@dataclass
class PerplexityResult:
    """Summed negative log-likelihood over ``tokens`` predicted tokens."""

    nll_sum: float
    tokens: int
    seq_length: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.tokens)

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "tokens": self.tokens, "seq_length": self.seq_length}


@torch.no_grad()
def megatron_perplexity(model: torch.nn.Module, windows: torch.Tensor, *,
                        micro_batch_size: int = 1) -> PerplexityResult:
    """PPL of a GPTModel over ``[n, L]`` windows (each window predicts its tokens 1..L-1)."""
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty [n, L >= 2] tensor, got "
                         f"{tuple(windows.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    try:
        for start in range(0, windows.shape[0], micro_batch_size):
            batch = windows[start:start + micro_batch_size].to(device)
            losses = model_forward(model, batch[:, :-1], batch[:, 1:])
            total += losses.double().sum().cpu()
            count += losses.numel()
    finally:
        model.train(was_training)
    return PerplexityResult(nll_sum=float(total), tokens=count, seq_length=windows.shape[1])
