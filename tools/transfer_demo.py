#!/usr/bin/env python
"""Domain mask transfer on the embedded model (SmolLM2-135M), on CPU.

Wikipedia -> Python standard-library source: dense, SparseGPT+update calibrated on the domain, the
general MaskLLM mask, and two domain masks at the same budget (from the domain SparseGPT prior and
from the general mask as prior); held-out PPL on both domains (docs/transfer.md). Stages whose
output exists are skipped; delete --work-dir to start over.

    python tools/transfer_demo.py --work-dir runs/transfer
    python tools/transfer_demo.py --dense CKPT --general-prior SPARSEGPT_CKPT --domain-iters 20
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

from megatron.sparse.transfer import TransferConfig, TransferStudy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, TransferConfig)
    TransferStudy(dataclass_from_args(TransferConfig, parser.parse_args())).run()


if __name__ == "__main__":
    run_main(main)
