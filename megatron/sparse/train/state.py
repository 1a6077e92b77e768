"""Resumable training state beside the model shards of a checkpoint iteration.

``iter_XXXXXXX/train_state.json``     step, parallel layout, run config
``iter_XXXXXXX/optim/tp_RR.pt``       AdamW state of TP rank RR (identical on its DP replicas)
``iter_XXXXXXX/rng/rank_GGG.pt``      torch CPU (and CUDA) RNG state of global rank GGG

All ``.pt`` files hold only tensors and plain containers and are read with ``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

STATE_FILE = "train_state.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def write_train_state(directory: Path, *, step: int, optimizer: torch.optim.Optimizer,
                      info: dict[str, Any]) -> None:
    """Write this rank's part of the training state into ``directory`` (every rank calls it)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if parallel_state.get_data_parallel_rank() == 0:
        (directory / "optim").mkdir(exist_ok=True)
        torch.save(optimizer.state_dict(), directory / "optim" / f"tp_{tp_rank:02d}.pt")
    (directory / "rng").mkdir(exist_ok=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, directory / "rng" / f"rank_{_rank():03d}.pt")
    if _rank() == 0:
        payload = {"step": step,
                   "tp": parallel_state.get_tensor_model_parallel_world_size(),
                   "dp": parallel_state.get_data_parallel_world_size(), **info}
        (directory / STATE_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True))


def read_train_state(directory: Path) -> dict[str, Any] | None:
    """The ``train_state.json`` of a checkpoint iteration, or None for a non-training checkpoint."""
    path = directory / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def restore_train_state(directory: Path, state: dict[str, Any],
                        optimizer: torch.optim.Optimizer) -> None:
    """Load optimizer and RNG state saved by :func:`write_train_state` (same TP x DP layout)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    dp = parallel_state.get_data_parallel_world_size()
    if (state["tp"], state["dp"]) != (tp, dp):
        raise ValueError(f"cannot resume: the checkpoint was written at TP={state['tp']} x "
                         f"DP={state['dp']}, this run is TP={tp} x DP={dp}; relaunch with the same "
                         f"layout")
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    optimizer.load_state_dict(
        torch.load(directory / "optim" / f"tp_{tp_rank:02d}.pt", weights_only=True))
    rng = torch.load(directory / "rng" / f"rank_{_rank():03d}.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
