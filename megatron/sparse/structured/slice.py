"""Physically remove pruned units: a checkpoint plus :class:`UnitMasks` -> a smaller checkpoint.

Slicing works on the unsharded (TP=1) megatron state dict, so the result does not depend on the
TP size the masks were learned at, and saves a TP-agnostic checkpoint that loads at every TP size
its per-layer sizes allow (:func:`megatron.sparse.structured.hetero.valid_tp_sizes`).

Per layer ``i`` (masks in canonical form):

* ``linear_qkv`` rows ``[q heads of g; k_g; v_g]`` of the kept KV groups ``g``, ``linear_proj``
  columns of the same groups' query heads;
* ``linear_fc1`` rows of the kept channels in both halves ``[gate; up]``, ``linear_fc2`` columns;
* a removed attention (MLP) block loses all its tensors and its input (pre-MLP) norm.

A result with the same sizes in every layer and no removed block is a plain LLaMA again (no
``block_configs``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron.sparse.model import LlamaArgs
from megatron.sparse.structured.hetero import LayerShape, heads_per_group
from megatron.sparse.structured.units import UnitMasks

_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
               "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def sliced_args(args: LlamaArgs, masks: UnitMasks) -> LlamaArgs:
    """The architecture left by ``masks`` (uniform results are plain LLaMA args)."""
    masks.validate(args)
    c = masks.canonical()
    shapes = [LayerShape(num_query_groups=int(g), ffn_hidden_size=int(f))
              for g, f in zip(c.kv_groups.sum(1), c.channels.sum(1))]
    base = args.to_dict()
    if len(set(shapes)) == 1 and shapes[0].num_query_groups and shapes[0].ffn_hidden_size:
        s = shapes[0]
        return LlamaArgs.from_dict(base | {
            "num_key_value_heads": s.num_query_groups, "head_dim": args.kv_channels,
            "num_attention_heads": s.num_query_groups * heads_per_group(args),
            "intermediate_size": s.ffn_hidden_size})
    return LlamaArgs.from_dict(base | {"block_configs": [s.block_config() for s in shapes]})


def slice_state_dict(state: dict[str, torch.Tensor], args: LlamaArgs,
                     masks: UnitMasks) -> dict[str, torch.Tensor]:
    """Slice a TP=1 megatron state dict of the unsliced model ``args`` (pure function).

    ``_extra_state`` entries are dropped; every other tensor is kept, sliced or removed.
    """
    masks.validate(args)
    c = masks.canonical()
    groups, hd, per = args.num_key_value_heads, args.kv_channels, heads_per_group(args)
    out = {}
    for key, t in state.items():
        if key.endswith("_extra_state") or not isinstance(t, torch.Tensor):
            continue
        parts = key.split(".")
        if parts[:2] != ["decoder", "layers"]:
            out[key] = t
            continue
        i, name = int(parts[2]), ".".join(parts[3:])
        g, ch = c.kv_groups[i], c.channels[i]
        if name.startswith(("self_attention.", "input_layernorm.")) and not c.attention[i]:
            continue
        if name.startswith(("mlp.", "pre_mlp_layernorm.")) and not c.mlp[i]:
            continue
        if name == "self_attention.linear_qkv.weight":
            t = t.reshape(groups, (per + 2) * hd, -1)[g].reshape(-1, t.shape[-1])
        elif name == "self_attention.linear_proj.weight":
            t = t.reshape(t.shape[0], groups, per * hd)[:, g].reshape(t.shape[0], -1)
        elif name == "mlp.linear_fc1.weight":
            t = torch.cat([half[ch] for half in torch.chunk(t, 2, dim=0)])
        elif name == "mlp.linear_fc2.weight":
            t = t[:, ch]
        elif not name.endswith("layernorm.weight"):
            raise ValueError(f"cannot slice {key}: a tensor this slicer does not know (only "
                             f"dense LLaMA linears and norms are sliced)")
        out[key] = t.contiguous()
    return out


def _slice_here(load_dir: str, masks: UnitMasks, save_dir: str) -> LlamaArgs:
    """The slice in this (1-rank, TP=1) process."""
    from megatron.sparse import checkpoint as ckpt
    from megatron.sparse.convert.pipeline import _dtype_of
    from megatron.sparse.structured.hf_export import sliced_hf_config

    meta = ckpt.read_checkpoint_meta(load_dir)
    args = LlamaArgs.from_dict(meta["model"])
    if args.block_configs:
        raise ValueError(f"{load_dir} is already sliced; slice the unsliced checkpoint with the "
                         f"combined masks")
    if ckpt.has_masks(meta):
        raise ValueError(f"{load_dir} holds 2:4 masks ({meta.get('mask_source')}); slice the "
                         f"dense checkpoint first, then prune the sliced model to 2:4")
    masks.validate(args)
    new_args = sliced_args(args, masks)
    model, _ = ckpt.load_model(load_dir, mask_kind="dense", params_dtype=_dtype_of(meta))
    state = slice_state_dict(model.state_dict(), args, masks)
    del model
    small = new_args.build(mask_kind="dense", params_dtype=_dtype_of(meta))
    result = small.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"sliced tensors do not match the sliced model: missing {missing}, "
                           f"unexpected {result.unexpected_keys}")
    out_meta = {k: v for k, v in meta.items() if k != "model"}
    out_meta.update(mask_source="none", mask_storage="dense", structure=structure_summary(
        args, new_args, masks, source=str(load_dir)))
    if meta.get("hf_config"):
        out_meta["hf_config"] = sliced_hf_config(meta["hf_config"], new_args)
    ckpt.save_checkpoint(save_dir, small, iteration=0, args=new_args, meta=out_meta)
    return new_args


def structure_summary(args: LlamaArgs, new_args: LlamaArgs, masks: UnitMasks,
                      source: str) -> dict[str, Any]:
    """What a slice kept, recorded in the sliced checkpoint's ``model_args.json``."""
    from megatron.sparse.structured.units import full_parameters

    c = masks.canonical()
    return {"source": source, "kept_parameters": masks.kept_parameters(args),
            "full_parameters": full_parameters(args),
            "kv_groups_per_layer": c.kv_groups.sum(1).tolist(),
            "channels_per_layer": c.channels.sum(1).tolist(),
            "uniform": new_args.block_configs is None}


def _child(load_dir: str, masks: UnitMasks, save_dir: str) -> None:
    for name in _LAUNCH_ENV:  # a fresh 1-rank group, not the launcher's
        os.environ.pop(name, None)
    from megatron.sparse import parallel

    with parallel.distributed(1):
        _slice_here(load_dir, masks, save_dir)


def slice_checkpoint(load_dir: str | Path, masks: UnitMasks, save_dir: str | Path) -> LlamaArgs:
    """Slice checkpoint ``load_dir`` by ``masks`` into a new checkpoint ``save_dir``.

    Returns the sliced model's args. Callable without a process group, in a 1-rank group, or on
    every rank of a multi-rank run (rank 0 slices in a spawned 1-rank process while the others
    wait; all ranks return the same args). ``load_dir`` is never written.
    """
    load_dir, save_dir = str(load_dir), str(save_dir)
    if Path(save_dir).resolve() == Path(load_dir).resolve():
        raise ValueError("the sliced checkpoint must go to a new directory, not --load")
    if dist.is_initialized() and dist.get_world_size() > 1:
        import torch.multiprocessing as mp

        if dist.get_rank() == 0:
            proc = mp.get_context("spawn").Process(target=_child,
                                                   args=(load_dir, masks, save_dir))
            proc.start()
            proc.join()
            ok = [proc.exitcode == 0]
        else:
            ok = [None]
        dist.broadcast_object_list(ok, src=0)
        if not ok[0]:
            raise RuntimeError("slicing failed on rank 0 (see its error above)")
        from megatron.sparse import checkpoint as ckpt

        return ckpt.read_model_args(save_dir)
    if dist.is_initialized():
        return _slice_here(load_dir, masks, save_dir)
    from megatron.sparse import parallel

    with parallel.distributed(1):
        return _slice_here(load_dir, masks, save_dir)
