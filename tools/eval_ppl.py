#!/usr/bin/env python
"""Perplexity of a megatron-sparse checkpoint (Megatron side, any TP).

    torchrun --nproc-per-node TP tools/eval_ppl.py --load CKPT --data wikitext2 --seq-length 4096

PPL = exp(mean token cross entropy) over non-overlapping windows of --seq-length of the text
tokenized once (megatron/sparse/eval/datasets.py). Sparse layers apply the checkpoint's masks
(fixed choices, or the argmax of learned logits); a checkpoint without masks (a plain conversion)
is evaluated dense. SLoRB branches recorded in the checkpoint (docs/slorb.md) are always applied.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron.sparse.cli import quiet_library_notices, run_main  # noqa: E402

quiet_library_notices()  # megatron-core warns at import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load", required=True, help="megatron-sparse checkpoint directory")
    p.add_argument("--data", required=True,
                   help="embedded (held-out embedded corpus), python-stdlib (held-out "
                        "standard-library files), wikitext2, or a raw text file")
    p.add_argument("--seq-length", type=int, required=True, help="window length in tokens")
    p.add_argument("--max-windows", type=int, default=None,
                   help="evaluate N windows evenly spaced over the data")
    p.add_argument("--micro-batch-size", type=int, default=1, help="windows per forward")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel size (default: the number of torchrun ranks)")
    p.add_argument("--dense", action="store_true",
                   help="ignore the masks (dense weights; SLoRB branches stay)")
    p.add_argument("--bf16", action="store_true", help="hold the model in bfloat16")
    p.add_argument("--json", action="store_true",
                   help='print one JSON line {"ppl": ..., "tokens": ..., "seq_length": ...}')
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    ns = parse_args(argv)
    import torch

    from megatron.sparse import checkpoint as ckpt
    from megatron.sparse import parallel
    from megatron.sparse.compat import default_device
    from megatron.sparse.eval.datasets import eval_windows
    from megatron.sparse.eval.perplexity import megatron_perplexity
    from megatron.sparse.model import LlamaArgs

    meta = ckpt.read_checkpoint_meta(ns.load)
    args = LlamaArgs.from_dict(meta["model"])
    tp = ns.tp or int(os.environ.get("WORLD_SIZE", 1))
    args.validate(tp)
    if ns.seq_length > args.max_position_embeddings:
        raise ValueError(f"--seq-length {ns.seq_length} exceeds the model's "
                         f"max_position_embeddings ({args.max_position_embeddings})")
    if not meta.get("tokenizer"):
        raise ValueError(f"{ns.load} records no tokenizer in its meta; reconvert it with "
                         f"tools/convert_hf_to_megatron.py")
    parallel.initialize(tp)
    try:
        from megatron.sparse.data.tokenizer import load_tokenizer

        windows = eval_windows(ns.data, load_tokenizer(meta["tokenizer"]),
                               seq_length=ns.seq_length, max_windows=ns.max_windows)
        dense = ns.dense or not ckpt.has_masks(meta)
        model, _ = ckpt.load_model(ns.load, mask_kind="dense" if dense else "fixed",
                                   params_dtype=torch.bfloat16 if ns.bf16 else torch.float32,
                                   device=default_device())
        source = meta.get("mask_source") or "none"
        result = megatron_perplexity(model, windows, micro_batch_size=ns.micro_batch_size)
        if ns.json:
            parallel.print_rank0(json.dumps(result.to_dict()))
        else:
            parallel.print_rank0(f"{ns.load}: PPL {result.ppl:.4f} on {ns.data} "
                                 f"({result.tokens} tokens, {windows.shape[0]} windows of "
                                 f"{ns.seq_length}; masks: {'dense' if dense else source}; "
                                 f"TP={tp})")
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    run_main(main)
