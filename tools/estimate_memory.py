#!/usr/bin/env python
"""Per-GPU memory and checkpoint size of each tool, without the hardware (meta-device model).

    python tools/estimate_memory.py --model llama2-7b --tp 8 --seq-length 4096 --micro-batch 1
    python tools/estimate_memory.py --load ckpts/smollm2 --tool train_mask --dtype fp32 --cpu
    python tools/estimate_memory.py --plan --model llama2-7b -- torchrun ... tools/train_mask.py ...

--plan is what the launchers run with DRY_RUN=1: it reads the settings back from the command
line the launcher would run, checks the TP layout, and prints the command and its memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron.sparse.cli import quiet_library_notices, run_main  # noqa: E402

quiet_library_notices()  # megatron-core warns at import time

from megatron.sparse.memory import PRESETS, TOOLS, MemoryConfig  # noqa: E402
from megatron.sparse.memory import report  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", choices=sorted(PRESETS), help="model preset")
    src.add_argument("--load", help="megatron-sparse checkpoint (reads its model_args.json)")
    p.add_argument("--tool", choices=(*TOOLS, "all"), default="all", help="tool to estimate")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per forward")
    p.add_argument("--seq-length", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="weights and activations dtype")
    p.add_argument("--prune-method", choices=("magnitude", "wanda", "sparsegpt"),
                   default="sparsegpt", help="one-shot method (prune)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (prune)")
    p.add_argument("--prune-micro-batch", type=int, default=4,
                   help="calibration sequences per forward (prune)")
    p.add_argument("--recompute", action="store_true", help="full activation recomputation")
    p.add_argument("--no-regulariser", action="store_true",
                   help="mask learning without the sparse-weight regulariser")
    p.add_argument("--cpu", action="store_true",
                   help="a CPU run (local attention, fused CPU mask kernel in fp32)")
    p.add_argument("--legacy-format", action="store_true",
                   help="checkpoints and models carry fp32 mask logits (pre-issue-15 format)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plan", action="store_true",
                   help="dry run of a launcher: the command after -- is what it would run")
    ns = p.parse_args(argv)
    if ns.plan and not command:
        p.error("--plan needs the launcher's command after --")
    return ns, command


def _model(ns: argparse.Namespace, *, required: bool = True):
    if ns.load:
        from megatron.sparse.checkpoint import read_model_args

        return read_model_args(ns.load)
    if ns.model:
        return ns.model
    if required:
        raise ValueError("give --model PRESET or --load CHECKPOINT")
    return None


def _configs(ns: argparse.Namespace) -> list[MemoryConfig]:
    model = _model(ns)
    tools = TOOLS if ns.tool == "all" else (ns.tool,)
    return [MemoryConfig(model=model, tool=tool, tp=ns.tp, dp=ns.dp, micro_batch=ns.micro_batch,
                         seq_length=ns.seq_length, dtype=ns.dtype, recompute=ns.recompute,
                         cpu=ns.cpu, regulariser=not ns.no_regulariser,
                         legacy_format=ns.legacy_format, prune_method=ns.prune_method,
                         calib_samples=ns.calib_samples, prune_micro_batch=ns.prune_micro_batch)
            for tool in tools]


def _plan(ns: argparse.Namespace, command: list[str]) -> None:
    from megatron.sparse.memory.plan import memory_config, plan_from_command

    plan = plan_from_command(command)
    model = None
    load = plan.flags.get("--load") or plan.flags.get("--hf")
    if load and os.path.isfile(os.path.join(load, "model_args.json")):
        from megatron.sparse.checkpoint import read_model_args

        model = read_model_args(load)
    model = model or _model(ns)
    cfg = memory_config(plan, model)
    args = cfg.args()
    args.validate(cfg.tp)
    name = model if isinstance(model, str) else f"{load} (model_args.json)"
    print(f"plan: {plan.tool} of {name}: TP {cfg.tp} x DP {cfg.dp} = world size {plan.world} "
          f"({plan.nnodes} node(s) x {plan.nproc} process(es))")
    print(f"command: {shlex.join(command)}")
    print(f"check: TP {cfg.tp} divides {args.num_attention_heads} attention heads, "
          f"{args.num_key_value_heads} KV heads, FFN {args.intermediate_size}, vocab "
          f"{args.vocab_size}: ok")
    for flag, path, exists in plan.paths():
        print(f"path {flag} {path}: {'exists' if exists else 'missing (not checked in a dry run)'}")
    e = cfg.estimate()
    print(f"settings: micro batch {cfg.micro_batch}, seq length {cfg.seq_length}, dtype "
          f"{cfg.dtype}" + (f", {cfg.prune_method} on {cfg.calib_samples} sequences"
                            if plan.tool == "prune" else ""))
    if ns.json:
        print(json.dumps(e.to_dict()))
    print(report.table([(plan.tool, e)]))
    print(f"memory: peak {report.gib(e.peak)} GiB per {'GPU' if e.per_gpu else 'host process'}"
          f", checkpoint {report.gib(e.checkpoint)} GiB")


def main(argv: list[str] | None = None) -> None:
    ns, command = parse_args(argv)
    if ns.plan:
        _plan(ns, command)
        return
    results = [(cfg.tool, cfg.estimate()) for cfg in _configs(ns)]
    if ns.json:
        print(json.dumps({tool: e.to_dict() for tool, e in results}))
        return
    cfg = _configs(ns)[0]
    args = cfg.args()
    print(f"{ns.model or ns.load}: hidden {args.hidden_size}, {args.num_layers} layers, "
          f"{args.num_attention_heads}/{args.num_key_value_heads} heads, FFN "
          f"{args.intermediate_size}, vocab {args.vocab_size}; TP {ns.tp} x DP {ns.dp}, micro "
          f"batch {ns.micro_batch}, seq {ns.seq_length}, {ns.dtype}"
          f"{', CPU' if ns.cpu else ''}")
    print(report.table(results))


if __name__ == "__main__":
    run_main(main)
