#!/usr/bin/env python
"""Learn 2:4 masks (MaskLLM): frozen weights, trainable mask logits.

    torchrun --nproc-per-node 8 tools/train_mask.py --load CKPT --data PREFIX --save OUT \\
        --prior ONESHOT_CKPT --seq-length 4096 --global-batch-size 256 --train-iters 2000

Under torchrun the TP size is --tp and the remaining ranks are data parallel. Re-running the same
command after preemption resumes from the newest checkpoint in --save.
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
from megatron.sparse.train.config import TrainConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tp", type=int, default=None,
                        help="tensor-parallel size (default: the number of ranks)")
    add_dataclass_args(parser, TrainConfig)
    ns = parser.parse_args()
    cfg = dataclass_from_args(TrainConfig, ns)
    world = int(os.environ.get("WORLD_SIZE", 1))
    parallel.initialize(ns.tp or world, seed=cfg.seed)
    try:
        from megatron.sparse.train.loop import MaskTrainer

        MaskTrainer(cfg).run()
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    run_main(main)
