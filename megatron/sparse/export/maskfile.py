"""The packed 2:4 mask file (DESIGN "Export formats"), compatible with published MaskLLM masks.

An ``np.savez_compressed`` archive with one uint8 array per Hugging Face weight, named
``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight.mask`` and
``model.layers.{i}.mlp.{gate,up,down}_proj.weight.mask``: ``np.packbits`` (most significant bit
first) of the boolean mask flattened in C order. Readers unpack with the known weight shape, check
the 2:4 invariant and never unpickle.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

MASK_SUFFIX = ".weight.mask"
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


def mask_key(layer: int, proj: str) -> str:
    """File key of one projection's mask, e.g. ``model.layers.0.self_attn.q_proj.weight.mask``."""
    if proj in ATTN_PROJ:
        return f"model.layers.{layer}.self_attn.{proj}{MASK_SUFFIX}"
    if proj in MLP_PROJ:
        return f"model.layers.{layer}.mlp.{proj}{MASK_SUFFIX}"
    raise ValueError(f"unknown projection {proj!r}; expected one of {ATTN_PROJ + MLP_PROJ}")


def expected_mask_shapes(config) -> dict[str, tuple[int, int]]:
    """``{key: (out, in)}`` for every sparse projection of a HF ``LlamaConfig`` (or dict)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    kv = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hidden // heads
    ffn = get("intermediate_size")
    shapes = {}
    for i in range(get("num_hidden_layers")):
        for proj, shape in (("q_proj", (heads * head_dim, hidden)),
                            ("k_proj", (kv * head_dim, hidden)),
                            ("v_proj", (kv * head_dim, hidden)),
                            ("o_proj", (hidden, heads * head_dim)),
                            ("gate_proj", (ffn, hidden)), ("up_proj", (ffn, hidden)),
                            ("down_proj", (hidden, ffn))):
            shapes[mask_key(i, proj)] = shape
    return shapes


def _is_two_four(mask: np.ndarray) -> bool:
    if mask.ndim != 2 or mask.shape[1] % 4 != 0:
        return False
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(axis=-1) == 2).all())


def pack_mask(mask) -> np.ndarray:
    """uint8 ``np.packbits`` (MSB first) of a boolean mask flattened in C order."""
    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return np.packbits(arr.astype(bool).reshape(-1), bitorder="big")


def unpack_mask(packed: np.ndarray, shape: tuple[int, ...], *, key: str = "mask") -> np.ndarray:
    """Inverse of :func:`pack_mask` for a weight of ``shape``; one-line error on a size mismatch."""
    numel = int(np.prod(shape))
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError(f"mask file entry {key}: expected a 1-D uint8 array, got "
                         f"{packed.dtype} of shape {packed.shape}")
    if packed.size != (numel + 7) // 8:
        raise ValueError(f"mask file entry {key}: {packed.size} bytes do not hold a mask of shape "
                         f"{tuple(shape)} ({(numel + 7) // 8} bytes expected)")
    return np.unpackbits(packed, count=numel, bitorder="big").astype(bool).reshape(shape)


def save_mask_file(path: str | Path, masks: dict) -> None:
    """Write ``{key: boolean [out, in] mask}`` as a packed mask file, atomically (2:4 checked)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"mask file {path} must end in .npz (np.savez_compressed appends it)")
    packed = {}
    for key, mask in masks.items():
        arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if not _is_two_four(arr.astype(bool)):
            raise ValueError(f"mask {key} of shape {arr.shape} is not 2:4 (every group of 4 input "
                             f"columns must keep exactly 2)")
        packed[key] = pack_mask(arr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    try:
        np.savez_compressed(tmp, **packed)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_mask_file(path: str | Path, expected_shapes: dict[str, tuple[int, ...]]
                   ) -> dict[str, torch.Tensor]:
    """Read a packed mask file into ``{key: torch.bool [out, in]}``.

    Raises a one-line ValueError naming the key for missing or extra keys, wrong sizes and masks
    that are not 2:4, and for unreadable, truncated or pickled files.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file {path} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"mask file {path} is not a readable .npz archive ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"mask file {path} is a single array, not an .npz archive of masks")
    with archive:
        keys = set(archive.files)
        missing = sorted(set(expected_shapes) - keys)
        extra = sorted(keys - set(expected_shapes))
        if missing:
            raise ValueError(f"mask file {path} lacks {len(missing)} expected key(s), first "
                             f"{missing[0]}")
        if extra:
            raise ValueError(f"mask file {path} has {len(extra)} unexpected key(s), first "
                             f"{extra[0]}")
        out = {}
        for key, shape in expected_shapes.items():
            try:
                packed = archive[key]
            except ValueError as exc:  # object arrays need pickle: refused
                raise ValueError(f"mask file {path} entry {key} cannot be read without unpickling "
                                 f"({exc}); refusing it") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise ValueError(f"mask file {path} entry {key} is truncated or corrupted "
                                 f"({exc})") from None
            mask = unpack_mask(packed, tuple(shape), key=key)
            if not _is_two_four(mask):
                raise ValueError(f"mask file {path} entry {key} is not 2:4 (every group of 4 "
                                 f"input columns must keep exactly 2)")
            out[key] = torch.from_numpy(mask.copy())
        return out
