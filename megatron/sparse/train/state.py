"""Resumable training state beside the model shards of a checkpoint iteration.

``iter_XXXXXXX/train_state.json``     step, parallel layout, run config
``iter_XXXXXXX/optim/tp_RR.pt``       AdamW state of TP rank RR (identical on its DP replicas)
``iter_XXXXXXX/rng/rank_GGG.pt``      torch CPU (and CUDA) RNG state of global rank GGG

All ``.pt`` files hold only tensors and plain containers and are read with ``weights_only=True``.

A training run tags its checkpoints in ``model_args.json`` with ``{"run": {"method": ...,
"seq_length": ..., "global_batch_size": ..., "data_prefix": ...}}`` (:func:`run_tag`);
:func:`check_resume` reads it before anything is written, so that ``--save`` never turns a
converted, pruned or imported checkpoint, or another model's run, into a training run. Training
checkpoints written before the tag existed (a ``train_state.json``, no tag) are MaskLLM runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron.sparse import checkpoint as ckpt
from megatron.sparse.train.distill import DistillConfig

STATE_FILE = "train_state.json"
RUN_KEY = "run"
# The run settings a resume must keep: they fix the data order (train/data.py) and the loss.
_RESUME_FIELDS = (("seq_length", "--seq-length"), ("global_batch_size", "--global-batch-size"),
                  ("data_prefix", "--data"), ("ce_weight", "--ce-weight"),
                  ("kd_weight", "--kd-weight"), ("kd_temperature", "--kd-temperature"))
# What a tag without loss settings (a run from before distillation) trained with.
_RESUME_DEFAULTS = asdict(DistillConfig())


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


def run_tag(method: str, *, seq_length: int, global_batch_size: int, data_prefix: str,
            distill: DistillConfig | None = None) -> dict[str, Any]:
    """The ``run`` entry of a training checkpoint's ``model_args.json`` (``distill``: the loss
    weights and temperature, recorded when given)."""
    return {"method": method, "seq_length": seq_length, "global_batch_size": global_batch_size,
            "data_prefix": os.path.abspath(data_prefix), **(asdict(distill) if distill else {})}


def saved_run(root: str | Path) -> dict[str, Any] | None:
    """The run tag of a checkpoint directory, None when it is not a training run.

    An untagged checkpoint whose latest iteration has a ``train_state.json`` (written before
    the tag existed) is a MaskLLM run with the settings recorded there.
    """
    meta = ckpt.read_checkpoint_meta(root)
    if RUN_KEY in meta:
        return meta[RUN_KEY]
    if ckpt.latest_iteration(root) is None:
        return None
    state = read_train_state(ckpt.iteration_dir(root, ckpt.latest_iteration(root)))
    if state is None:
        return None
    config = state.get("config", {})
    return {"method": "maskllm", "seq_length": config.get("seq_length"),
            "global_batch_size": config.get("global_batch_size"),
            "data_prefix": config.get("data") and os.path.abspath(config["data"])}


def check_resume(root: str | Path, flag: str, *, run: dict[str, Any],
                 model: dict[str, Any] | None = None, override: bool = False) -> bool:
    """Whether ``root`` holds a run to resume (False: no checkpoint there yet).

    One-line ValueError, before anything is written, when ``root`` is a checkpoint but not a
    training run of ``run["method"]``, a run of another model (``model``: the expected
    ``model_args.json`` model entry), or a run with other resume settings (unless ``override``).
    """
    root = Path(root)
    if not (root / ckpt.ARGS_FILE).is_file():
        if ckpt.latest_iteration(root) is not None:
            raise ValueError(f"{flag} {root} holds checkpoint iterations but no {ckpt.ARGS_FILE}; "
                             f"it is not a training run: choose a new {flag} directory")
        return False
    saved = saved_run(root)
    method = run["method"]
    if saved is None:
        source = ckpt.read_checkpoint_meta(root).get("mask_source", "none")
        kind = "converted" if source in ("none", None) else f"{source} (one-shot or imported)"
        raise ValueError(f"{flag} {root} is a {kind} checkpoint, not a {method} training run; "
                         f"it is left untouched: choose a new {flag} directory")
    if saved.get("method") != method:
        raise ValueError(f"{flag} {root} is a {saved.get('method')} training run, not {method}; "
                         f"choose a new {flag} directory")
    if model is not None:
        have = ckpt.read_checkpoint_meta(root)["model"]
        if not ckpt.same_model(have, model):
            raise ValueError(f"{flag} {root} is a training run of another model (hidden "
                             f"{have.get('hidden_size')}, {have.get('num_layers')} layers vs "
                             f"hidden {model.get('hidden_size')}, {model.get('num_layers')} "
                             f"layers); choose a new {flag} directory")
    def setting(tag, key):
        return tag.get(key, _RESUME_DEFAULTS.get(key))

    changed = [f"{opt} {setting(saved, key)} -> {setting(run, key)}"
               for key, opt in _RESUME_FIELDS
               if setting(saved, key) is not None and setting(saved, key) != setting(run, key)]
    if changed and not override:
        raise ValueError(f"cannot resume {root}: the run changed {', '.join(changed)}; use the "
                         f"saved settings, a new {flag} directory, or --override-resume-config")
    return ckpt.latest_iteration(root) is not None
