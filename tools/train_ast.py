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

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron.sparse.cli import quiet_library_notices, run_main  # noqa: E402

quiet_library_notices()  # megatron-core warns at import time

from megatron.sparse.train.config import AstConfig  # noqa: E402
from megatron.sparse.train.entry import train_main  # noqa: E402


def main() -> None:
    from megatron.sparse.train.ast import check_ast_config

    train_main(AstConfig, __doc__.split("\n\n")[0], check=check_ast_config)


if __name__ == "__main__":
    run_main(main)
