#!/usr/bin/env python
"""Time and peak memory of one-shot 2:4 pruning per method on the embedded model's shape.

    python benchmarks/bench_prune.py [--load CKPT] [--samples 128] [--seq-length 512] \\
        [--methods magnitude,wanda,sparsegpt]

With ``--load`` the converted embedded checkpoint (tools/convert_hf_to_megatron.py --hf embedded)
is pruned on random calibration tokens (time and memory do not depend on the token values);
without it a randomly initialised model of the same architecture (SmolLM2-135M: 30 layers,
hidden 576, FFN 1536, 9/3 heads, vocab 49152) is used. Each method runs in a fresh process so
that the peak RSS is its own. Prints one line per method and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def smollm2_args():
    from megatron.sparse.model import LlamaArgs

    return LlamaArgs(hidden_size=576, num_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                     rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def run_one(ns: argparse.Namespace) -> dict:
    """Prune once in this process; returns seconds and peak memory."""
    import torch

    from megatron.sparse import parallel
    from megatron.sparse.prune.calibration import peak_memory_mib, prune_model

    parallel.initialize(1)
    try:
        if ns.load:
            from megatron.sparse.checkpoint import load_model

            model, args = load_model(ns.load)
        else:
            args = smollm2_args()
            model = args.build()
        tokens = torch.randint(0, args.vocab_size, (ns.samples, ns.seq_length),
                               generator=torch.Generator().manual_seed(0))
        method, _, update = ns.method.partition("+")
        start = time.perf_counter()
        prune_model(model, tokens, method=method, update_weight=bool(update),
                    micro_batch_size=ns.micro_batch_size,
                    log=(lambda m: print(m, file=sys.stderr, flush=True)) if ns.verbose else None)
        seconds = time.perf_counter() - start
        return {"method": ns.method, "seconds": round(seconds, 1),
                "peak_memory_mib": round(peak_memory_mib()), "samples": ns.samples,
                "seq_length": ns.seq_length, "threads": torch.get_num_threads()}
    finally:
        parallel.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", default=None, help="converted embedded checkpoint (optional)")
    p.add_argument("--samples", type=int, default=128, help="calibration sequences")
    p.add_argument("--seq-length", type=int, default=512, help="calibration sequence length")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per layer forward")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt,sparsegpt+update",
                   help="comma-separated: magnitude, wanda, sparsegpt, sparsegpt+update")
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)  # child process
    p.add_argument("--verbose", action="store_true", help="per-layer progress on stderr")
    ns = p.parse_args()
    if ns.method:
        print(json.dumps(run_one(ns)), flush=True)
        return
    results = []
    for method in ns.methods.split(","):
        cmd = [sys.executable, "-W", "ignore", os.path.abspath(__file__), "--method", method,
               "--samples", str(ns.samples), "--seq-length", str(ns.seq_length),
               "--micro-batch-size", str(ns.micro_batch_size)]
        cmd += (["--load", ns.load] if ns.load else []) + (["--verbose"] if ns.verbose else [])
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK",
                                                                 "WORLD_SIZE")}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        sys.stderr.write(out.stderr if ns.verbose else "")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(row)
        print(f"{method:18s} {row['seconds']:8.1f} s   peak RSS {row['peak_memory_mib']:6d} MiB   "
              f"({ns.samples} x {ns.seq_length} calibration tokens, {row['threads']} threads)",
              flush=True)
    print(json.dumps({"model": ns.load or "random SmolLM2-135M shape", "results": results}))


if __name__ == "__main__":
    main()
