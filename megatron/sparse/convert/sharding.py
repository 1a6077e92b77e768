"""Split a full (TP=1) megatron-core state dict into TP shards and merge shards back.

Layouts per TP rank r of n (DESIGN "Model and conversion"):
- column-parallel (``linear_qkv``, ``word_embeddings``, ``output_layer``): rows chunk r of n; with
  qkv stored per KV group ``[q_g; k_g; v_g]`` a row chunk holds whole KV groups;
- ``linear_fc1``: ``[gate_r; up_r]`` (chunk r of gate rows, then chunk r of up rows);
- row-parallel (``linear_proj``, ``linear_fc2``): input columns chunk r of n;
- mask tensors (``mask_logits [rows, groups, 6]``, ``mask_choice [rows, groups]``) and SLoRB's
  ``slorb.S [rows, in/k]`` follow their weight (rows, or groups for row-parallel); SLoRB's
  trainable projection ``slorb.X [in/k, k]`` is replicated for column-parallel linears and split
  along its rows (the input groups) for row-parallel ones;
- everything else (norms) is replicated.
"""

from __future__ import annotations

import torch

_COLUMN = (".linear_qkv.", "embedding.word_embeddings.", "output_layer.")
_FC1 = ".linear_fc1."
_ROW = (".linear_proj.", ".linear_fc2.")


def _sharded_like_weight(key: str) -> bool:
    return key.endswith((".weight", ".mask_logits", ".mask_choice", ".slorb.S"))


def _rule(key: str) -> str:
    if key.endswith("_extra_state"):
        return "skip"
    if key.endswith(".slorb.X"):
        return "groups" if any(p in key for p in _ROW) else "replicated"
    if _FC1 in key and _sharded_like_weight(key):
        return "fc1"
    if any(p in key or key.startswith(p) for p in _COLUMN) and not key.endswith("layer_norm_weight"):
        return "column"
    if any(p in key for p in _ROW) and _sharded_like_weight(key):
        return "row"
    return "replicated"


def _split(t: torch.Tensor, n: int, dim: int, key: str) -> list[torch.Tensor]:
    if t.shape[dim] % n != 0:
        raise ValueError(f"{key}: dimension {dim} of shape {tuple(t.shape)} is not divisible by "
                         f"the tensor-parallel size {n}")
    return list(torch.chunk(t, n, dim=dim))


def shard_tensor(key: str, t: torch.Tensor, tp_size: int) -> list[torch.Tensor]:
    """The ``tp_size`` per-rank pieces of one full tensor."""
    rule = _rule(key)
    if rule == "column":
        return [p.clone() for p in _split(t, tp_size, 0, key)]
    if rule in ("row", "groups"):
        return [p.clone() for p in _split(t, tp_size, 1 if rule == "row" else 0, key)]
    if rule == "fc1":
        gate, up = _split(t, 2, 0, key)
        return [torch.cat([g, u], 0) for g, u in zip(_split(gate, tp_size, 0, key),
                                                      _split(up, tp_size, 0, key))]
    return [t.clone() for _ in range(tp_size)]


def merge_tensor(key: str, pieces: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`."""
    rule = _rule(key)
    if rule == "column":
        return torch.cat(pieces, 0)
    if rule in ("row", "groups"):
        return torch.cat(pieces, 1 if rule == "row" else 0)
    if rule == "fc1":
        halves = [torch.chunk(p, 2, 0) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
    return pieces[0].clone()


def shard_state_dict(full: dict[str, torch.Tensor], tp_size: int) -> list[dict[str, torch.Tensor]]:
    """Split a TP=1 state dict into ``tp_size`` per-rank state dicts (``_extra_state`` dropped)."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]
    for key, t in full.items():
        if _rule(key) == "skip" or not isinstance(t, torch.Tensor):
            continue
        for rank, piece in enumerate(shard_tensor(key, t, tp_size)):
            shards[rank][key] = piece
    return shards


def merge_state_dicts(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Merge per-rank state dicts back into one TP=1 state dict."""
    return {key: merge_tensor(key, [s[key] for s in shards])
            for key, t in shards[0].items()
            if _rule(key) != "skip" and isinstance(t, torch.Tensor)}


def full_shape(key: str, local_shape: tuple[int, ...], tp_size: int) -> tuple[int, ...]:
    """Shape of the unsharded tensor whose TP shard ``key`` has ``local_shape``."""
    shape = list(local_shape)
    rule = _rule(key)
    if rule in ("column", "fc1", "groups"):
        shape[0] *= tp_size
    elif rule == "row":
        shape[1] *= tp_size
    return tuple(shape)
