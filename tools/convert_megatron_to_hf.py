#!/usr/bin/env python
"""Convert a megatron-sparse checkpoint (any TP) back to a Hugging Face safetensors directory.

Weights are written as stored (dense); tools/export_hf.py writes the 2:4-masked model instead.

    python tools/convert_megatron_to_hf.py --load ckpts/smollm2 --out hf/smollm2
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
    p.add_argument("--load", required=True, help="megatron-sparse checkpoint directory")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ns = p.parse_args()
    parallel.initialize(1)
    try:
        from megatron.sparse.convert.pipeline import convert_megatron_to_hf

        convert_megatron_to_hf(ns.load, ns.out, overwrite=ns.overwrite)
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    run_main(main)
