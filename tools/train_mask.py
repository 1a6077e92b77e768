#!/usr/bin/env python
"""Learn 2:4 masks (MaskLLM): frozen weights, trainable mask logits.

    torchrun --nproc-per-node 8 tools/train_mask.py --load CKPT --data PREFIX --save OUT \\
        --prior ONESHOT_CKPT --seq-length 4096 --global-batch-size 256 --train-iters 2000

Under torchrun the TP size is --tp and the remaining ranks are data parallel. Re-running the same
command after preemption resumes from the newest checkpoint in --save.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron.sparse.cli import quiet_library_notices, run_main  # noqa: E402

quiet_library_notices()  # megatron-core warns at import time

from megatron.sparse.train.config import TrainConfig  # noqa: E402
from megatron.sparse.train.entry import train_main  # noqa: E402


def main() -> None:
    train_main(TrainConfig, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    run_main(main)
