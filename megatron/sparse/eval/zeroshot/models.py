"""The two model sides of a zero-shot run: a megatron-sparse checkpoint, or a HF model + mask."""

from __future__ import annotations

import torch

from megatron.sparse.eval.zeroshot.megatron_lm import MegatronLM, ShardedForward


def megatron_forward(load: str, *, dense: bool = False, bf16: bool = False) -> ShardedForward:
    """Load a checkpoint at the current TP size (its masks applied unless ``dense``)."""
    from megatron.sparse import checkpoint as ckpt
    from megatron.sparse.compat import default_device

    meta = ckpt.read_checkpoint_meta(load)
    dense = dense or not ckpt.has_masks(meta)
    model, _ = ckpt.load_model(load, mask_kind="dense" if dense else "fixed",
                               params_dtype=torch.bfloat16 if bf16 else torch.float32,
                               device=default_device())
    return ShardedForward(model=model)


def checkpoint_tokenizer(load: str):
    """The tokenizer a checkpoint's meta records (one-line error if it records none)."""
    from megatron.sparse import checkpoint as ckpt
    from megatron.sparse.data.tokenizer import load_tokenizer

    meta = ckpt.read_checkpoint_meta(load)
    if not meta.get("tokenizer"):
        raise ValueError(f"{load} records no tokenizer in its meta; reconvert it with "
                         f"tools/convert_hf_to_megatron.py")
    return load_tokenizer(meta["tokenizer"])


def megatron_lm(load: str, forward: ShardedForward, *, batch_size: int) -> MegatronLM:
    """The lm-eval LM of a loaded checkpoint (rank 0)."""
    from megatron.sparse import checkpoint as ckpt
    from megatron.sparse.model import LlamaArgs

    args = LlamaArgs.from_dict(ckpt.read_checkpoint_meta(load)["model"])
    return MegatronLM(forward=forward, tokenizer=checkpoint_tokenizer(load),
                      max_length=args.max_position_embeddings, batch_size=batch_size)


def hf_lm(spec: str, *, mask: str | None = None, batch_size: int = 8):
    """lm-eval's stock ``HFLM`` over ``embedded`` or a HF directory, a packed mask applied."""
    from lm_eval.models.huggingface import HFLM

    from megatron.sparse.data.tokenizer import load_tokenizer
    from megatron.sparse.eval.hf_perplexity import apply_mask_file, load_hf_model

    model = load_hf_model(spec)
    if torch.cuda.is_available():
        model = model.cuda()
    if mask:
        apply_mask_file(model, mask)
    return HFLM(pretrained=model, tokenizer=load_tokenizer(spec), batch_size=batch_size,
                max_length=getattr(model.config, "max_position_embeddings", None))
