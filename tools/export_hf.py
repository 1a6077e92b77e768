#!/usr/bin/env python
"""Export a checkpoint's 2:4 masks to Hugging Face: masked safetensors + packed mask file.

Runs on one process and loads a checkpoint of any TP size (shards are merged by resharding).

    python tools/export_hf.py --load ckpts/maskllm --out hf/smollm2-2of4 [--mask-file masks.npz]
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
    p.add_argument("--load", required=True, help="pruned or mask-trained checkpoint")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--mask-file", default=None, help="packed mask file (default: OUT/masks.npz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ns = p.parse_args()
    parallel.initialize(1)
    try:
        from megatron.sparse.export.hf import export_hf

        export_hf(ns.load, ns.out, mask_file=ns.mask_file, overwrite=ns.overwrite)
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    run_main(main)
