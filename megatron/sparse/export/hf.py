"""Export learned (or one-shot) 2:4 masks to Hugging Face, and import mask files back."""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron.sparse import checkpoint as ckpt
from megatron.sparse.convert.hf_to_megatron import linears_to_megatron
from megatron.sparse.convert.megatron_to_hf import linear_to_hf, megatron_to_hf
from megatron.sparse.convert.pipeline import (_dtype_of, check_output_dir, hf_config_from_args)
from megatron.sparse.convert.sharding import shard_tensor
from megatron.sparse.export.maskfile import expected_mask_shapes, load_mask_file, save_mask_file
from megatron.sparse.export.slorb_hf import hf_export_parts
from megatron.sparse.export.trim import eval_masks, masked_state_dict
from megatron.sparse.hf_checkpoint import save_hf_checkpoint
from megatron.sparse.layers import sparse_layers
from megatron.sparse.mask import is_two_four
from megatron.sparse.prune.apply import store_mask

MASK_FILE = "masks.npz"


def hf_config(meta: dict, args) -> dict:
    """The HF config recorded at conversion, or one rebuilt from the model args."""
    return meta.get("hf_config") or hf_config_from_args(args)


def hf_masks(masks: dict[str, torch.Tensor], args) -> dict[str, torch.Tensor]:
    """Megatron ``{linear weight key: mask}`` -> ``{HF weight key + ".mask": mask}``."""
    out = {}
    for key, mask in masks.items():
        for hf_key, hf_mask in linear_to_hf(key, mask, args).items():
            out[hf_key + ".mask"] = hf_mask
    return out


def export_hf(load: str, out: str | Path, *, mask_file: str | Path | None = None,
              overwrite: bool = False, log=print) -> tuple[Path, Path]:
    """Trim a checkpoint (any TP) to a masked HF safetensors dir plus the packed mask file.

    SLoRB branches are exported as a ``slorb_llama`` model (:mod:`megatron.sparse.export.slorb_hf`).
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    meta = ckpt.read_checkpoint_meta(load)
    if not ckpt.has_masks(meta):
        raise ValueError(f"{load} holds no masks (mask_source {meta.get('mask_source', 'none')!r}, "
                         f"mask_storage {ckpt.stored_mask_kind(meta)!r}); prune it "
                         f"(tools/prune_oneshot.py) or learn masks (tools/train_mask.py) first")
    model, args = ckpt.load_model(load, mask_kind="fixed", params_dtype=_dtype_of(meta))
    masks = eval_masks(model)
    bad = [k for k, m in masks.items() if not is_two_four(m)]
    if bad:
        raise ValueError(f"masks of {bad[0]} are not 2:4")
    state = megatron_to_hf(masked_state_dict(model, masks), args)
    config, files = hf_export_parts(meta, hf_config(meta, args))
    save_hf_checkpoint(out, config=config, state=state, tokenizer=meta.get("tokenizer"),
                       overwrite=overwrite, extra_files=files)
    mask_path = Path(mask_file) if mask_file else out / MASK_FILE
    save_mask_file(mask_path, hf_masks(masks, args))
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    log(f"exported {len(masks)} sparse linears ({kept / total:.1%} of their weights kept, source "
        f"{meta.get('mask_source')}) to {out}; masks in {mask_path} "
        f"({mask_path.stat().st_size / 2**20:.2f} MiB)")
    return out, mask_path


@torch.no_grad()
def import_masks(load: str, mask_file: str, save: str, *, as_prior: bool, strength: float,
                 seed: int = 1234, overwrite: bool = False, log=print) -> None:
    """Load a packed mask file into a checkpoint at the current TP, as fixed masks or a prior.

    Both store the masks as fixed 2:4 choices; a prior is marked ``mask_role: "prior"`` with its
    ``prior_strength`` and ``prior_seed``, from which tools/train_mask.py creates the logits.
    """
    if Path(save).resolve() == Path(load).resolve():
        raise ValueError("--save must differ from --load (the source checkpoint stays untouched)")
    if ckpt.latest_iteration(save) is not None and not overwrite:
        raise FileExistsError(f"{save} already holds a checkpoint; pass --overwrite")
    meta = ckpt.read_checkpoint_meta(load)
    args = ckpt.read_model_args(load)
    shapes = expected_mask_shapes(hf_config(meta, args))
    masks = linears_to_megatron({k.removesuffix(".mask"): v
                                 for k, v in load_mask_file(mask_file, shapes).items()}, args)
    model, _ = ckpt.load_model(load, mask_kind="fixed", with_masks=False,
                               params_dtype=_dtype_of(meta))
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for name, layer in sparse_layers(model):
        store_mask(layer, shard_tensor(f"{name}.weight", masks.pop(f"{name}.weight"), tp)[rank])
    out_meta = {k: v for k, v in meta.items()
                if k not in ("model", "logits_are_init", "mask_role", "prior_strength",
                             "prior_seed")}
    out_meta["mask_source"] = f"imported-{'prior' if as_prior else 'fixed'}:{Path(mask_file).name}"
    out_meta["mask_role"] = "prior" if as_prior else "fixed"
    if as_prior:
        out_meta.update(prior_strength=float(strength), prior_seed=int(seed))
    ckpt.save_checkpoint(save, model, iteration=0, args=args, meta=out_meta)
    log(f"imported {len(sparse_layers(model))} masks from {mask_file} as "
        f"{'a prior (strength ' + str(strength) + ')' if as_prior else 'fixed masks'}; "
        f"saved {save}")
