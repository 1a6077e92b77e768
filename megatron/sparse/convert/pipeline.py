"""Whole-checkpoint conversions used by the tools (HF dir <-> megatron-sparse checkpoint)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from megatron.sparse import checkpoint as ckpt
from megatron.sparse.convert.hf_to_megatron import hf_to_megatron
from megatron.sparse.convert.megatron_to_hf import megatron_to_hf
from megatron.sparse.export.slorb_hf import hf_export_parts
from megatron.sparse.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint, save_tokenizer
from megatron.sparse.model import LlamaArgs


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing checkpoint/model directory unless ``overwrite``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to "
                              f"replace it")


def _params_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    return floats.pop() if len(floats) == 1 else torch.float32


def _publish(tmp: Path, out: Path) -> None:
    """Move a finished directory into place, replacing ``out`` only after it is complete."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)


def convert_hf_to_megatron(hf: str, out: str | Path, *, tp: int, overwrite: bool = False,
                           log=print) -> LlamaArgs:
    """HF checkpoint -> megatron-sparse checkpoint (run in a 1-rank process group).

    The sparse layers carry no mask (``mask_storage: dense``). The torch_dist checkpoint is TP-agnostic: it loads at any TP size that divides the model;
    ``tp`` is validated up front and recorded as the intended size.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    log(f"reading {hf}")
    source = load_hf_checkpoint(hf)
    args = LlamaArgs.from_hf_config(source.config)
    args.validate(tp)
    state = hf_to_megatron(source.state, args)
    log(f"building the megatron model ({args.num_layers} layers, hidden {args.hidden_size})")
    model = args.build(mask_kind="dense", params_dtype=_params_dtype(source.state))
    result = model.load_state_dict(state, strict=False)
    unexpected = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if unexpected or result.unexpected_keys:
        raise ValueError(f"conversion left tensors unmatched: {unexpected + result.unexpected_keys}")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tokenizer = source.tokenizer
        if tokenizer is None:
            log(f"warning: {hf} has no tokenizer files; tools that tokenise text will need a "
                f"checkpoint with one")
        elif tokenizer != "embedded":
            (tmp / "tokenizer").mkdir(parents=True)
            save_tokenizer(tokenizer, tmp / "tokenizer")
            tokenizer = str((out / "tokenizer").resolve())
        meta = {"hf_config": source.config, "tokenizer": tokenizer, "mask_source": "none",
                "tp": tp, "source": hf}
        ckpt.save_checkpoint(tmp, model, iteration=0, args=args, meta=meta)
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f"wrote {out} (loads at TP={tp}, or any TP dividing the model)")
    return args


def convert_megatron_to_hf(load: str | Path, out: str | Path, *, overwrite: bool = False,
                           log=print) -> Path:
    """megatron-sparse checkpoint (any TP) -> HF safetensors directory, weights as stored.

    A SLoRB checkpoint becomes a ``slorb_llama`` directory (:mod:`megatron.sparse.export.slorb_hf`).
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    meta = ckpt.read_checkpoint_meta(load)
    model, args = ckpt.load_model(load, mask_kind="dense", params_dtype=_dtype_of(meta))
    state = megatron_to_hf(model.state_dict(), args)
    config, files = hf_export_parts(meta, meta.get("hf_config") or hf_config_from_args(args))
    save_hf_checkpoint(out, config=config, state=state, tokenizer=meta.get("tokenizer"),
                       overwrite=overwrite, extra_files=files)
    log(f"wrote {out}")
    return out


def _dtype_of(meta: dict) -> torch.dtype:
    name = (meta.get("hf_config") or {}).get("torch_dtype") or \
        (meta.get("hf_config") or {}).get("dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def hf_config_from_args(args: LlamaArgs) -> dict:
    """A minimal HF LlamaConfig dict for a model without a recorded HF config."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": args.hidden_size, "num_hidden_layers": args.num_layers,
            "num_attention_heads": args.num_attention_heads,
            "num_key_value_heads": args.num_key_value_heads,
            "intermediate_size": args.intermediate_size, "vocab_size": args.vocab_size,
            "max_position_embeddings": args.max_position_embeddings,
            "rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling,
            "rms_norm_eps": args.rms_norm_eps, "tie_word_embeddings": args.tie_word_embeddings,
            "head_dim": args.kv_channels, "hidden_act": "silu", **args.extra}
