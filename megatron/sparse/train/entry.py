"""The command line of the training tools: parse a run config, start the process groups, train.

``tools/train_mask.py`` and ``tools/train_ast.py`` differ only in their config class (and AST's
checks before any process group starts), so both call :func:`train_main`.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

from megatron.sparse import parallel
from megatron.sparse.cli import add_dataclass_args, dataclass_from_args


def train_main(config_cls: type, description: str,
               check: Callable[[object], None] | None = None) -> None:
    """Parse ``config_cls`` flags (plus ``--tp``), run ``check(cfg)``, then train under torchrun.

    Under torchrun the TP size is ``--tp`` (default: every rank) and the other ranks are data
    parallel; the method (mask learning or AST) follows from the config class.
    """
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tp", type=int, default=None,
                        help="tensor-parallel size (default: the number of ranks)")
    add_dataclass_args(parser, config_cls)
    ns = parser.parse_args()
    cfg = dataclass_from_args(config_cls, ns)
    if check is not None:
        check(cfg)  # before any process group starts
    world = int(os.environ.get("WORLD_SIZE", 1))
    parallel.initialize(ns.tp or world, seed=cfg.seed)
    try:
        from megatron.sparse.train.loop import Trainer

        Trainer(cfg).run()
    finally:
        parallel.shutdown()
