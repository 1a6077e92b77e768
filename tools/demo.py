#!/usr/bin/env python
"""The megatron-sparse pipeline on the embedded default model (SmolLM2-135M), on CPU.

convert -> preprocess -> one-shot baselines -> MaskLLM from the SparseGPT prior -> PPL table,
curves PNG -> export to Hugging Face (masked safetensors + masks.npz), re-evaluated with
transformers. Stages whose output exists are skipped; delete --work-dir to start over.
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

from megatron.sparse.demo import DemoConfig, Pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataclass_args(parser, DemoConfig)
    Pipeline(dataclass_from_args(DemoConfig, parser.parse_args())).run()


if __name__ == "__main__":
    run_main(main)
