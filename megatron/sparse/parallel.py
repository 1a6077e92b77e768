"""torch.distributed + megatron-core model-parallel set-up for tools and tests."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron.sparse.compat import apply_cpu_shim, default_backend


def initialize(tp_size: int = 1, *, seed: int = 1234, backend: str | None = None,
               init_method: str | None = None) -> None:
    """Start the process group (torchrun env, or a 1-process group) and megatron's TP groups.

    ``tp_size`` must divide the world size; the remaining factor is data parallel. A process
    started without ``torchrun`` (no ``MASTER_PORT``, world size 1) rendezvouses through an
    in-memory store, so it never races other processes for a TCP port. ``init_method`` (for
    example ``file:///tmp/x``) overrides the environment rendezvous.
    """
    apply_cpu_shim()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if init_method:
            kwargs = {"init_method": init_method}
        elif world == 1 and "MASTER_PORT" not in os.environ:
            kwargs = {"store": dist.HashStore()}
        else:
            kwargs = {}  # torchrun's env:// rendezvous
        dist.init_process_group(backend or default_backend(), rank=rank, world_size=world,
                                **kwargs)
    world = dist.get_world_size()
    if tp_size < 1 or world % tp_size != 0:
        raise ValueError(f"--tp {tp_size} does not divide the number of processes ({world}); "
                         f"launch with a multiple of the TP size (torchrun --nproc-per-node)")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Tear down megatron's groups and the process group."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(tp_size: int = 1, *, seed: int = 1234):
    """Context manager around :func:`initialize` / :func:`shutdown`."""
    initialize(tp_size, seed=seed)
    try:
        yield
    finally:
        shutdown()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def gather_last_dim(x: torch.Tensor, tp: int, group) -> torch.Tensor:
    """All-gather ``x`` over a ``tp``-rank group and concatenate along its last dimension."""
    if tp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def is_main() -> bool:
    """True on global rank 0 (or without a process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)
