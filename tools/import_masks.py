#!/usr/bin/env python
"""Load a packed 2:4 mask file (ours or a published MaskLLM one) into a checkpoint.

--as-fixed: the masks become the checkpoint's eval masks exactly. --as-prior: the same compact
fixed masks, marked as a prior with --prior-strength (mask transfer): tools/train_mask.py --load
on the result starts its logits from them. Runs at any TP (torchrun --nproc-per-node TP).

    python tools/import_masks.py --load ckpts/dense --mask-file masks.npz --save ckpts/fixed --as-fixed
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
    p.add_argument("--load", required=True, help="checkpoint of the model the masks belong to")
    p.add_argument("--mask-file", required=True, help="packed .npz mask file")
    p.add_argument("--save", required=True, help="output checkpoint directory")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--as-fixed", action="store_true", help="use the masks as they are")
    mode.add_argument("--as-prior", action="store_true", help="initialise learnable logits")
    p.add_argument("--prior-strength", type=float, default=3.0,
                   help="with --as-prior: logits shift in units of their std")
    p.add_argument("--seed", type=int, default=1234, help="with --as-prior: seed of the logits init the trainer starts from")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint in --save")
    ns = p.parse_args()
    parallel.initialize(int(os.environ.get("WORLD_SIZE", 1)), seed=ns.seed)
    try:
        from megatron.sparse.export.hf import import_masks

        import_masks(ns.load, ns.mask_file, ns.save, as_prior=ns.as_prior,
                     strength=ns.prior_strength, seed=ns.seed, overwrite=ns.overwrite,
                     log=parallel.print_rank0)
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    run_main(main)
