"""Megatron-style checkpoints via ``dist_checkpointing``: save at one TP size, load at another.

Layout of a checkpoint directory::

    model_args.json                      LlamaArgs + tokenizer source, enough to rebuild the model
    latest_checkpointed_iteration.txt    e.g. "200"
    iter_0000200/                        dist_checkpointing (torch_dist) shards of the model

``model_args.json`` holds ``format_version`` (2) and ``mask_storage``: ``"dense"`` (no mask
tensors: converted checkpoints), ``"fixed"`` (a uint8 ``mask_choice`` per sparse linear: one-shot
and imported masks) or ``"logits"`` (fp32 ``mask_logits``: mask-learning runs). ``slorb``
(``{"k", "train_projection"}``) is present when the sparse linears carry SLoRB branches, whose
``<linear>.slorb.S`` / ``.slorb.X`` tensors reshard with their weight
(:mod:`megatron.sparse.slorb`). Format 1 (no
``format_version``) stored logits in every checkpoint; it still loads: as logits for training,
as their argmax for evaluation, export and pruning, and as dense when it is a plain conversion.

Writes are atomic: an iteration is written to ``iter_XXXXXXX.tmp-<pid>`` and renamed once every
rank finished; the ``latest`` file is replaced with ``os.replace``. A crash mid-save leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

from megatron.sparse import mask as mask_ops
from megatron.sparse import slorb
from megatron.sparse.heap import trim_heap
from megatron.sparse.layers import (
    MASK_TENSORS,
    is_mask_key,
    mask_kind_of,
    sparse_layers,
    staged_masks,
)
from megatron.sparse.model import LlamaArgs

ARGS_FILE = "model_args.json"
LATEST_FILE = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 2


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_model_args(root: str | Path, args: LlamaArgs, meta: dict[str, Any] | None = None) -> None:
    """Write ``model_args.json`` (rank 0 only, atomically)."""
    root = Path(root)
    if _is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        payload = {"model": args.to_dict(), **(meta or {})}
        _atomic_write_text(root / ARGS_FILE, json.dumps(payload, indent=2, sort_keys=True))
    _barrier()


def read_checkpoint_meta(root: str | Path) -> dict[str, Any]:
    """The parsed ``model_args.json`` of a checkpoint, with a clear error when it is missing."""
    path = Path(root) / ARGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a megatron-sparse checkpoint (no {ARGS_FILE}); "
                                f"convert one first with tools/convert_hf_to_megatron.py")
    return json.loads(path.read_text())


def read_model_args(root: str | Path) -> LlamaArgs:
    return LlamaArgs.from_dict(read_checkpoint_meta(root)["model"])


def format_version(meta: dict[str, Any]) -> int:
    """The checkpoint format of a ``model_args.json`` (1 when it predates the field)."""
    version = int(meta.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise ValueError(f"checkpoint format_version {version} is newer than this megatron-sparse "
                         f"reads ({FORMAT_VERSION}); update megatron-sparse")
    return version


def stored_mask_kind(meta: dict[str, Any]) -> str:
    """The mask tensors a checkpoint holds on disk: "dense", "fixed" or "logits"."""
    if format_version(meta) == 1:
        return "logits"
    return meta.get("mask_storage", "dense")


def has_masks(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint holds meaningful masks (pruned, imported or learned)."""
    return meta.get("mask_source", "none") not in ("none", None) and \
        stored_mask_kind(meta) != "dense"


def inference_mask_kind(meta: dict[str, Any]) -> str:
    """The mask kind eval, export and pruning build for a checkpoint: "dense" or "fixed".

    Learned logits (and format-1 logits) become their argmax; a conversion (``mask_source``
    none, whose format-1 logits were untrained zeros) is dense.
    """
    return "fixed" if has_masks(meta) else "dense"


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two ``model_args.json`` model entries describe the same model (``extra`` aside)."""
    return a | {"extra": {}} == b | {"extra": {}}


def latest_iteration(root: str | Path) -> int | None:
    """The iteration in ``latest_checkpointed_iteration.txt``, or None when there is none."""
    path = Path(root) / LATEST_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{path} holds {text!r}, not an iteration number")
    return int(text)


def _sharded_metadata() -> dict[str, Any]:
    return {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


def model_sharded_state_dict(model: torch.nn.Module) -> dict:
    """The model's sharded state dict, prefixed ``model.``."""
    return model.sharded_state_dict(prefix="model.", metadata=_sharded_metadata())


def save_checkpoint(root: str | Path, model: torch.nn.Module, *, iteration: int,
                    args: LlamaArgs | None = None, meta: dict[str, Any] | None = None,
                    extra_sharded: dict | None = None,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Save ``model`` (and optional extra sharded state) as iteration ``iteration`` of ``root``.

    All ranks must call this. ``args``/``meta`` (re)write ``model_args.json``, with
    ``format_version``, the model's ``mask_storage`` and its SLoRB settings (``slorb``).
    ``write_extra(dir)`` runs on every rank to add files (optimizer, RNG) to the iteration
    before it is published.
    """
    root = Path(root)
    final = iteration_dir(root, iteration)
    if _is_rank0():
        root.mkdir(parents=True, exist_ok=True)
    if args is not None:
        meta = {k: v for k, v in (meta or {}).items() if k != slorb.META_KEY}
        if slorb.slorb_config(model):
            meta[slorb.META_KEY] = slorb.slorb_config(model)
        write_model_args(root, args, {**meta, "format_version": FORMAT_VERSION,
                                      "mask_storage": mask_kind_of(model)})
    tmp_name = [f"{final.name}.tmp-{os.getpid()}"]
    if dist.is_initialized():
        dist.broadcast_object_list(tmp_name, src=0)
    tmp = root / tmp_name[0]
    if _is_rank0():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    state = model_sharded_state_dict(model)
    if extra_sharded:
        state.update(extra_sharded)
    dist_checkpointing.save(state, str(tmp))
    if write_extra is not None:
        write_extra(tmp)
    _barrier()
    if _is_rank0():
        if final.exists():
            old = root / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _atomic_write_text(root / LATEST_FILE, str(iteration))
    _barrier()
    return final


def remove_old_iterations(root: str | Path, *, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``iter_*`` directories of ``root`` (rank 0 only).

    The iteration named by ``latest_checkpointed_iteration.txt`` is always kept; nothing else
    in ``root`` is touched. Returns the deleted directories."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    if not _is_rank0() or not root.is_dir():
        return []
    iterations = sorted(int(p.name[5:]) for p in root.iterdir()
                        if p.is_dir() and re.fullmatch(r"iter_\d{7,}", p.name))
    latest = latest_iteration(root)
    removed = []
    for it in iterations[:-keep]:
        if it != latest:
            shutil.rmtree(iteration_dir(root, it))
            removed.append(iteration_dir(root, it))
    return removed


def resolve_iteration(root: str | Path, iteration: int | None = None) -> Path:
    """The directory of ``iteration`` (default: the latest) with a one-line error if absent."""
    root = Path(root)
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"{root} holds no checkpoint ({LATEST_FILE} is missing)")
    path = iteration_dir(root, iteration)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint iteration directory {path} does not exist")
    return path


def load_into(root: str | Path, model: torch.nn.Module, *, iteration: int | None = None,
              extra_sharded: dict | None = None, strict: bool = True,
              masks: bool = True) -> dict:
    """Load a checkpoint into an already built model at the current TP size.

    Returns the loaded extra state (keys of ``extra_sharded``). Tensors absent from the checkpoint
    are an error unless ``strict=False`` (then they keep their init values). ``masks=False``
    loads everything but the sparse layers' mask tensors (see :func:`load_masks`).
    """
    path = resolve_iteration(root, iteration)
    state = model_sharded_state_dict(model)
    if not masks:
        state = {k: v for k, v in state.items() if not is_mask_key(k)}
    if not strict:
        saved = set(dist_checkpointing.load_tensors_metadata(str(path)).keys())
        state = {k: v for k, v in state.items() if getattr(v, "key", k) in saved}
    for value in state.values():
        if isinstance(value, ShardedTensorFactory):
            _merge_in_place(value)
    if extra_sharded:
        state.update(extra_sharded)
    loaded = dist_checkpointing.load(state, str(path))
    model_state = {k[len("model."):]: v for k, v in loaded.items() if k.startswith("model.")}
    own = model.state_dict(keep_vars=True)
    if not masks:
        own = {k: v for k, v in own.items() if not is_mask_key(k)}
    if strict:
        missing = sorted(k for k in own.keys() - model_state.keys()
                         if not k.endswith("_extra_state"))
        unexpected = sorted(model_state.keys() - own.keys())
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing}, "
                               f"unexpected {unexpected}")
    # the sharded tensors are the model's own, filled in place by dist_checkpointing; only what
    # came back in other storage is copied in
    model.load_state_dict({k: v for k, v in model_state.items()
                           if not _same_storage(v, own.get(k))}, strict=False)
    return {k: v for k, v in loaded.items() if not k.startswith("model.")}


def _same_storage(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())


def _merge_in_place(factory: ShardedTensorFactory) -> None:
    """Let a factory's merge return its own tensor when the loaded parts are chunks of it.

    megatron-core's swiglu factory (linear_fc1) splits the tensor into views for loading and
    ``cat``s the loaded parts into a new tensor; when dist_checkpointing filled those views in
    place, that concatenation is a copy of the model tensor, so it is skipped.
    """
    merge, data = factory.merge_fn, factory.data

    def merged(parts):
        if isinstance(parts, (list, tuple)) and parts and isinstance(data, torch.Tensor):
            for dim in range(data.dim()):
                chunks = torch.chunk(data, len(parts), dim=dim)
                if len(chunks) == len(parts) and all(map(_same_storage, chunks, parts)):
                    return data
        return merge(parts)

    factory.merge_fn = merged


def load_model(root: str | Path, *, iteration: int | None = None, sparse: bool = True,
               mask_kind: str | None = None, with_masks: bool = True,
               params_dtype: torch.dtype = torch.float32, device=None):
    """Build the model a checkpoint describes at the current TP size and load its weights.

    ``mask_kind`` defaults to :func:`inference_mask_kind` (fixed masks, or dense for a
    conversion); ``with_masks=False`` leaves the masks at their init (pruning replaces them).
    A SLoRB branch recorded in the meta is re-attached before loading.
    Returns ``(model, args)``.
    """
    meta = read_checkpoint_meta(root)
    format_version(meta)  # a newer format is a one-line error before anything is built
    args = LlamaArgs.from_dict(meta["model"])
    kind = mask_kind or inference_mask_kind(meta)
    model = args.build(sparse=sparse, mask_kind=kind, params_dtype=params_dtype, device=device,
                       initialize=False)  # the load fills every weight
    slorb.attach_from_meta(model, meta)
    load_into(root, model, iteration=iteration, masks=False)
    if with_masks:
        load_masks(root, model, iteration=iteration)
    trim_heap()  # the read buffers of the load are free now; do not keep them in the RSS
    return model, args


def _read_staged(path: Path, model: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """The checkpoint's ``kind`` mask tensors of every sparse layer (local TP shards)."""
    suffix = "." + MASK_TENSORS[kind]
    with staged_masks(model, kind) as staged:
        state = {k: v for k, v in model_sharded_state_dict(model).items() if k.endswith(suffix)}
        loaded = dist_checkpointing.load(state, str(path))
    return {name: loaded[f"model.{name}{suffix}"] for name in staged}


def load_mask_choices(root: str | Path, model: torch.nn.Module, *,
                      iteration: int | None = None) -> dict[str, torch.Tensor]:
    """``{layer name: uint8 [rows, in/4] local candidate choices}`` of a checkpoint's masks.

    Fixed masks are read as they are; logits (format 2 runs or any format-1 checkpoint) are
    reduced to their argmax. The model's own masks are untouched.
    """
    meta = read_checkpoint_meta(root)
    stored = stored_mask_kind(meta)
    if stored == "dense":
        raise ValueError(f"{root} holds no masks (mask_storage 'dense', a conversion); prune it "
                         f"(tools/prune_oneshot.py) or import masks (tools/import_masks.py)")
    path = resolve_iteration(root, iteration)
    if stored == "fixed":
        return _read_staged(path, model, "fixed")
    logits = _read_staged(path, model, "logits")
    return {name: mask_ops.argmax_candidates(logits.pop(name)).to(torch.uint8)
            for name in list(logits)}


@torch.no_grad()
def load_masks(root: str | Path, model: torch.nn.Module, *,
               iteration: int | None = None) -> None:
    """Load a checkpoint's masks into ``model``'s sparse layers (weights untouched).

    A fixed-mask model takes fixed choices or the argmax of stored logits; a logits model
    (the trainer's resume) needs stored logits; a dense model has nothing to load.
    """
    kind = mask_kind_of(model)
    if kind == "dense":
        return
    if kind == "fixed":
        choices = load_mask_choices(root, model, iteration=iteration)
        for name, layer in sparse_layers(model):
            layer.set_mask_choice(choices[name])
        return
    stored = stored_mask_kind(read_checkpoint_meta(root))
    if stored != "logits":
        raise ValueError(f"{root} stores {stored} masks, not mask logits; start a run from it "
                         f"as --load or --prior instead of resuming it")
    path = resolve_iteration(root, iteration)
    state = {k: v for k, v in model_sharded_state_dict(model).items()
             if k.endswith(".mask_logits")}
    loaded = dist_checkpointing.load(state, str(path))
    model.load_state_dict({k[len("model."):]: v for k, v in loaded.items()}, strict=False)
