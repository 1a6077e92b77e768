#!/usr/bin/env python
"""Structural pruning by policy gradient: learn which KV groups, MLP channels and blocks to keep.

    torchrun --nproc-per-node N tools/prune_structured.py --load DENSE --calib-data PREFIX \\
        --keep-ratio 0.8 --units channels,heads --init wanda-sp --steps 100 --save OUT

Forward passes only. ``--steps 0`` is the metric-only baseline (structured Wanda-sp). Writes
OUT/unit_masks.npz (the final masks, megatron/sparse/structured/units.py), OUT/structured.json
(parameter counts and per-layer widths) and OUT/structured_state.pt (resumable learning state).
TP = --tp (default: the number of ranks); the remaining ranks are data parallel.
See docs/structured.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron.sparse.cli import quiet_library_notices, run_main  # noqa: E402

quiet_library_notices()  # megatron-core warns at import time

from megatron.sparse.cli import add_dataclass_args, dataclass_from_args  # noqa: E402
from megatron.sparse.structured.config import StructConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_args(p, StructConfig)
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel size (default: the number of torchrun ranks)")
    p.add_argument("--eval-masks", default=None,
                   help="only evaluate this unit_masks.npz on --eval-data (no init, no learning)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    ns = parse_args(argv)
    from megatron.sparse.structured.run import run_structured

    cfg = dataclass_from_args(StructConfig, ns)
    run_structured(cfg, tp=ns.tp or int(os.environ.get("WORLD_SIZE", 1)),
                   eval_masks=ns.eval_masks)


if __name__ == "__main__":
    run_main(main)
