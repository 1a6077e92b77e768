#!/usr/bin/env python
"""Adaptive sparse training (AST): retrain the weights under magnitude 2:4 masks that follow them.

    torchrun --nproc-per-node 8 tools/train_ast.py --tp 8 --load CKPT --data PREFIX --save OUT \\
        --seq-length 4096 --global-batch-size 128 --train-iters 15000 --mask-interval 10

--load is a converted dense checkpoint (the masks start as magnitude 2:4 of its weights) or a
one-shot pruned one (its masks start the run). Under torchrun the TP size is --tp and the
remaining ranks are data parallel. Re-running the same command after preemption resumes from the
newest checkpoint in --save. See docs/ast.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron.sparse.cli import (  # noqa: E402
    add_dataclass_args, dataclass_from_args, quiet_library_notices, run_main,
)

quiet_library_notices()  # megatron-core warns at import time

from megatron.sparse import parallel  # noqa: E402
from megatron.sparse.train.config import AstConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tp", type=int, default=None,
                        help="tensor-parallel size (default: the number of ranks)")
    add_dataclass_args(parser, AstConfig)
    ns = parser.parse_args()
    cfg = dataclass_from_args(AstConfig, ns)
    from megatron.sparse.train.ast import check_ast_config

    check_ast_config(cfg)  # before any process group starts
    world = int(os.environ.get("WORLD_SIZE", 1))
    parallel.initialize(ns.tp or world, seed=cfg.seed)
    try:
        from megatron.sparse.train.loop import Trainer

        Trainer(cfg).run()
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    run_main(main)
