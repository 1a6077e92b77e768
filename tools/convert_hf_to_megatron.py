#!/usr/bin/env python
"""Convert a Hugging Face LLaMA-family checkpoint to a megatron-sparse checkpoint.

    python tools/convert_hf_to_megatron.py --hf embedded --tp 1 --out ckpts/smollm2
    python tools/convert_hf_to_megatron.py --hf /models/Llama-2-7b-hf --tp 8 --out ckpts/llama2-7b
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron.sparse.cli import quiet_library_notices, run_main  # noqa: E402

quiet_library_notices()  # megatron-core warns at import time

from megatron.sparse import parallel  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True,
                   help="'embedded' (SmolLM2-135M), a HF checkpoint directory, or a hub id")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint is for")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ns = p.parse_args()
    parallel.initialize(1)
    try:
        from megatron.sparse.convert.pipeline import convert_hf_to_megatron

        convert_hf_to_megatron(ns.hf, ns.out, tp=ns.tp, overwrite=ns.overwrite)
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    run_main(main)
