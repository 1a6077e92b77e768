#!/usr/bin/env python
"""Zero-shot accuracy through lm-evaluation-harness: a megatron-sparse checkpoint or a HF model.

    torchrun --nproc-per-node TP tools/eval_zeroshot.py --load CKPT --tasks local
    python tools/eval_zeroshot.py --model HF_DIR|embedded [--mask masks.npz] \\
        --tasks hellaswag,piqa,winogrande,arc_easy,arc_challenge,boolq,rte,openbookqa

``--tasks local`` scores the offline held-out tasks built from the embedded corpus
(embedded_cloze, embedded_choice); a task YAML file or an lm-eval task name works too (registry
tasks download their data). Prints a table (task, metric, value, stderr); ``--output`` writes
JSON with the table and every example's metrics. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron.sparse.cli import quiet_library_notices, run_main  # noqa: E402

quiet_library_notices()  # megatron-core warns at import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="megatron-sparse checkpoint directory (any TP)")
    src.add_argument("--model", help="Hugging Face model directory or 'embedded' (stock HFLM)")
    p.add_argument("--mask", default=None, help="packed 2:4 mask file (.npz) for --model")
    p.add_argument("--tasks", required=True,
                   help="comma-separated: local, embedded_cloze, embedded_choice, task YAML "
                        "files, lm-eval task names")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per query")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    p.add_argument("--limit", type=int, default=None, help="score only N examples per task")
    p.add_argument("--local-examples", type=int, default=400,
                   help="examples per embedded held-out task")
    p.add_argument("--seed", type=int, default=1234, help="seed of the embedded held-out tasks")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel size (default: the number of torchrun ranks)")
    p.add_argument("--dense", action="store_true", help="--load: ignore the masks")
    p.add_argument("--bf16", action="store_true", help="--load: hold the model in bfloat16")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    ns = p.parse_args(argv)
    if ns.mask and not ns.model:
        p.error("--mask applies to --model (a Megatron checkpoint carries its own masks)")
    return ns


def main(argv: list[str] | None = None) -> None:
    ns = parse_args(argv)
    from megatron.sparse.eval.zeroshot import runner

    if ns.limit is not None and ns.limit < 1:
        raise ValueError(f"--limit must be >= 1 (examples per task), got {ns.limit}")
    if ns.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {ns.batch_size}")
    plan = runner.parse_tasks(ns.tasks)
    if ns.model:
        _evaluate(ns, plan, runner, lambda: _hf(ns))
        return
    from megatron.sparse import parallel
    from megatron.sparse.eval.zeroshot import models

    parallel.initialize(ns.tp or int(os.environ.get("WORLD_SIZE", 1)))
    try:
        forward = models.megatron_forward(ns.load, dense=ns.dense, bf16=ns.bf16)
        if not parallel.is_main():
            forward.follow()
            return
        try:
            _evaluate(ns, plan, runner,
                      lambda: models.megatron_lm(ns.load, forward, batch_size=ns.batch_size))
        finally:
            forward.stop()
    finally:
        parallel.shutdown()


def _hf(ns):
    from megatron.sparse.eval.zeroshot import models

    return models.hf_lm(ns.model, mask=ns.mask, batch_size=ns.batch_size)


def _evaluate(ns, plan, runner, make_lm) -> None:
    start = time.perf_counter()
    lm = make_lm()
    with tempfile.TemporaryDirectory(prefix="zeroshot-tasks-") as tmp:
        runner.build_embedded_tasks(plan, Path(tmp), n_examples=ns.local_examples, seed=ns.seed)
        results = runner.run_tasks(lm, plan, num_fewshot=ns.num_fewshot, limit=ns.limit)
    rows = runner.result_rows(results)
    print(runner.format_table(rows), flush=True)
    if ns.output:
        runner.write_json(ns.output, {
            "model": ns.load or ns.model, "mask": ns.mask, "tasks": plan.names,
            "num_fewshot": ns.num_fewshot, "limit": ns.limit, "seed": ns.seed,
            "local_examples": ns.local_examples, "seconds": time.perf_counter() - start,
            "results": rows, "examples": runner.per_example(results)})
        print(f"wrote {ns.output}", flush=True)


if __name__ == "__main__":
    run_main(main)
