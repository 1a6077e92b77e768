#!/usr/bin/env python
"""Perplexity with ``transformers`` alone, optionally applying a packed 2:4 mask file.

    python tools/eval_hf_ppl.py --model HF_DIR|embedded [--mask masks.npz] --data wikitext2 \\
        --seq-length 4096 [--json]

The same protocol and token stream as tools/eval_ppl.py, so an exported mask file can be checked
to reproduce the Megatron-side perplexity. SLoRB exports (tools/export_hf.py of a SLoRB checkpoint)
load their shipped modeling file (docs/export.md, "SLoRB").
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
    p.add_argument("--model", required=True, help="Hugging Face model directory or 'embedded'")
    p.add_argument("--mask", default=None, help="packed 2:4 mask file (.npz) to apply")
    p.add_argument("--data", required=True,
                   help="embedded (held-out embedded corpus), python-stdlib (held-out "
                        "standard-library files), wikitext2, or a raw text file")
    p.add_argument("--seq-length", type=int, required=True, help="window length in tokens")
    p.add_argument("--max-windows", type=int, default=None,
                   help="evaluate N windows evenly spaced over the data")
    p.add_argument("--micro-batch-size", type=int, default=1, help="windows per forward")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run a model directory's own modeling code (not needed for "
                        "megatron-sparse SLoRB exports, whose file is recognised)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON line {"ppl": ..., "tokens": ..., "seq_length": ...}')
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    ns = parse_args(argv)
    import torch

    from megatron.sparse.eval.datasets import eval_windows
    from megatron.sparse.eval.hf_perplexity import apply_mask_file, hf_perplexity, load_hf_model

    model = load_hf_model(ns.model, trust_remote_code=ns.trust_remote_code)
    if torch.cuda.is_available():
        model = model.cuda()
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and ns.seq_length > limit:
        raise ValueError(f"--seq-length {ns.seq_length} exceeds the model's "
                         f"max_position_embeddings ({limit})")
    masked = apply_mask_file(model, ns.mask) if ns.mask else 0
    from megatron.sparse.data.tokenizer import load_tokenizer

    windows = eval_windows(ns.data, load_tokenizer(ns.model), seq_length=ns.seq_length,
                           max_windows=ns.max_windows)
    result = hf_perplexity(model, windows, micro_batch_size=ns.micro_batch_size)
    if ns.json:
        print(json.dumps(result.to_dict()), flush=True)
    else:
        print(f"{ns.model}: PPL {result.ppl:.4f} on {ns.data} ({result.tokens} tokens, "
              f"{windows.shape[0]} windows of {ns.seq_length}; "
              f"{f'{masked} masked weights from {ns.mask}' if ns.mask else 'dense'})", flush=True)


if __name__ == "__main__":
    run_main(main)
