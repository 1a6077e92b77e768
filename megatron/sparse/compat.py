"""CPU compatibility shim for megatron-core.

megatron-core assumes CUDA in a handful of places (current device, CUDA RNG state,
``torch.cuda.synchronize``). On a machine without a GPU, :func:`apply_cpu_shim` routes those
calls to their CPU equivalents so that GPTModel, the tensor-parallel layers and
``dist_checkpointing`` run on the gloo backend, and works around a CPU math quirk of torch
(:func:`warm_up_cpu_math`). With a GPU present it does nothing.
Entry points and tests call it explicitly; importing the package never patches anything.
"""

from __future__ import annotations

import torch

_SHIM_FLAG = "_megatron_sparse_cpu_shim"


def _cpu_current_device() -> str:
    return "cpu"


def _cpu_get_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _mcore_get_rng_state(device=None, clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _mcore_set_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _cpu_manual_seed_all(seed: int) -> None:
    """torch.manual_seed calls this after seeding the CPU generator: nothing left to do."""


def _cpu_synchronize(device=None) -> None:
    """Nothing to wait for on the CPU."""


def warm_up_cpu_math() -> None:
    """Run one of torch's vectorised CPU math functions on a throw-away tensor.

    With PyTorch 2.13 on this project's 2-thread AVX-512 CI machine, the first such call of a
    process (exp, log, ...) is sometimes (measured: 1 process in 4 to 6) off by up to 1.5e-4
    relative, and every later call is exact to float32. One call up front keeps that first
    inaccurate result out of real work (it made a kernel-vs-reference test flaky).
    """
    torch.exp(torch.zeros(1024))


def cpu_shim_needed() -> bool:
    """True when no CUDA device is usable, i.e. when :func:`apply_cpu_shim` would patch."""
    return not torch.cuda.is_available()


def apply_cpu_shim() -> bool:
    """Patch the CUDA-only calls megatron-core makes; idempotent. Returns True if patched."""
    if not cpu_shim_needed():
        return False
    if getattr(torch.cuda, _SHIM_FLAG, False):
        return True
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = _cpu_current_device
    torch.cuda.get_rng_state = _cpu_get_rng_state
    torch.cuda.set_rng_state = _cpu_set_rng_state
    torch.cuda.manual_seed = _cpu_manual_seed
    # Each patched name gets its own function object: torch.compile's trace rules refuse one
    # object registered under two torch names.
    torch.cuda.manual_seed_all = _cpu_manual_seed_all
    torch.cuda.synchronize = _cpu_synchronize
    mcore_random._get_cuda_rng_state = _mcore_get_rng_state
    mcore_random._set_cuda_rng_state = _mcore_set_rng_state
    warm_up_cpu_math()
    setattr(torch.cuda, _SHIM_FLAG, True)
    return True


def default_device() -> torch.device:
    """The device models are placed on: the current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_backend() -> str:
    """torch.distributed backend: nccl with GPUs, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"
