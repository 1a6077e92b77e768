"""The few collectives a training step needs: all-reduce (CPU tensors through NCCL), the global
gradient norm under TP, the DP gradient average, and the preemption flag all ranks agree on."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

from megatron.sparse.compat import default_device


def tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of ``t`` over ``group``; CPU tensors go through the GPU under NCCL."""
    if not dist.is_initialized() or dist.get_world_size(group) <= 1:
        return t
    if t.device.type == "cpu" and dist.get_backend(group) == "nccl":
        staged = t.to(default_device())
        dist.all_reduce(staged, op=op, group=group)
        return t.copy_(staged)
    dist.all_reduce(t, op=op, group=group)
    return t


def average_over_dp(params: list[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the data-parallel replicas."""
    dp = parallel_state.get_data_parallel_world_size()
    if dp <= 1:
        return
    group = parallel_state.get_data_parallel_group()
    for p in params:
        if p.grad is not None:
            all_reduce(p.grad, group).div_(dp)


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients: TP shards summed, a parameter that every TP rank holds
    whole (norms) counted once, DP replicas identical."""
    local = torch.zeros(1, dtype=torch.float64)
    for p in params:
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p):
            local += p.grad.double().pow(2).sum().cpu()
    return all_reduce(local, tp_group()).sqrt()


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global norm is at most ``max_norm`` (0: no clip);
    returns the norm before clipping."""
    norm = grad_norm(params)
    if max_norm > 0:
        coef = float(max_norm / (norm + 1e-6))
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return norm


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1; checked (and agreed on by all ranks) after each step."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.raised = True

    def any_rank(self) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0])
        return bool(all_reduce(flag, None, op=dist.ReduceOp.MAX).item())
