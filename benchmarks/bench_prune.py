#!/usr/bin/env python
"""Time and peak memory of one-shot 2:4 pruning per method on the embedded model's shape.

    python benchmarks/bench_prune.py [--load CKPT] [--samples 128] [--seq-length 512] \\
        [--methods magnitude,wanda,sparsegpt]

With ``--load`` the converted embedded checkpoint (tools/convert_hf_to_megatron.py --hf embedded)
is pruned on random calibration tokens (time and memory do not depend on the token values);
without it a randomly initialised model of the same architecture (SmolLM2-135M: 30 layers,
hidden 576, FFN 1536, 9/3 heads, vocab 49152) is used. Each method runs in a fresh process so
that the peak RSS is its own. Prints one line per method and a JSON summary.

    python benchmarks/bench_prune.py --peer llmcompressor --peer-python /path/to/venv/bin/python \
        [--samples 32] [--seq-length 512] [--repeats 2] [--work-dir DIR]

compares our SparseGPT + weight update with llm-compressor's on the same calibration windows and
one evaluator (see benchmarks/prune_vs_peer.py); llm-compressor pins its own transformers, so it
usually lives in a separate venv. Without llm-compressor in ``--peer-python`` the peer is skipped
with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
        micro_batch_size = ns.micro_batch_size or 8
        start = time.perf_counter()
        prune_model(model, tokens, method=method, update_weight=bool(update),
                    micro_batch_size=micro_batch_size,
                    log=(lambda m: print(m, file=sys.stderr, flush=True)) if ns.verbose else None)
        seconds = time.perf_counter() - start
        return {"method": ns.method, "seconds": round(seconds, 1),
                "peak_memory_mib": round(peak_memory_mib()), "samples": ns.samples,
                "seq_length": ns.seq_length, "threads": torch.get_num_threads()}
    finally:
        parallel.shutdown()


def compare_with_peer(ns: argparse.Namespace) -> None:
    """Ours vs the peer, back to back per repeat; prints a table of the three ratios."""
    import prune_vs_peer as peer  # benchmarks/ is on sys.path when run as a script

    version = peer.peer_available(ns.peer_python)
    if version is None:
        print(f"skipping the llmcompressor comparison: llmcompressor is not installed in "
              f"{ns.peer_python} (pip install llmcompressor there, then pass --peer-python)")
        return
    from megatron.sparse.cli import quiet_library_notices

    quiet_library_notices()
    samples, seq = ns.samples or 32, ns.seq_length
    work = Path(ns.work_dir)
    paths = peer.prepare(work, samples=samples, seq_length=seq)
    runs_file = work / f"runs_{samples}x{seq}.json"
    runs = json.loads(runs_file.read_text()) if ns.skip_prune and runs_file.is_file() else []
    for repeat in range(0 if ns.skip_prune else ns.repeats):
        sides = [lambda: peer.run_ours(paths, work, samples=samples, seq_length=seq,
                                       micro_batch_size=ns.micro_batch_size),
                 lambda: peer.run_peer(paths, work, peer_python=ns.peer_python,
                                       batch_size=ns.peer_batch_size)]
        rows = {row["side"]: row for row in (run() for run in sides[::1 - 2 * (repeat % 2)])}
        runs.append(rows)
        print(f"run {repeat + 1}: ours {rows['ours']['seconds']:.1f} s, "
              f"{rows['ours']['peak_rss_mib']} MiB; llmcompressor "
              f"{rows['llmcompressor']['seconds']:.1f} s, {rows['llmcompressor']['peak_rss_mib']} "
              f"MiB", flush=True)
    if not ns.skip_prune:
        runs_file.write_text(json.dumps(runs))
    if ns.skip_eval:
        print(json.dumps({"peer": f"llmcompressor {version}", "runs": runs}))
        return
    ev = peer.evaluate(paths, work, seq_length=seq, max_windows=ns.eval_windows)
    print(f"\nSparseGPT + weight update, 2:4, {samples} x {seq} calibration tokens (same windows), "
          f"llmcompressor {version}; PPL on held-out embedded text, {ev['eval_windows'][0]} x "
          f"{seq} windows, one evaluator (dense {ev['ppl_dense']:.2f})")
    print(f"{'run':>4} {'ours s':>8} {'peer s':>8} {'time':>6} {'ours MiB':>9} {'peer MiB':>9} "
          f"{'memory':>7} {'ours PPL':>9} {'peer PPL':>9} {'PPL':>7}")
    ppl = ev["ppl_ours"] / ev["ppl_llmcompressor"]
    for i, rows in enumerate(runs):
        o, q = rows["ours"], rows["llmcompressor"]
        print(f"{i + 1:>4} {o['seconds']:8.1f} {q['seconds']:8.1f} "
              f"{o['seconds'] / q['seconds']:6.2f} {o['peak_rss_mib']:9d} {q['peak_rss_mib']:9d} "
              f"{o['peak_rss_mib'] / q['peak_rss_mib']:7.2f} {ev['ppl_ours']:9.3f} "
              f"{ev['ppl_llmcompressor']:9.3f} {ppl:7.4f}")
    print(f"ratios are ours/peer; time and peak RSS are whole processes (load + calibrate + "
          f"prune + save, no evaluation); masks agree on {ev['mask_agreement']:.1%} of weights")
    print(json.dumps({"peer": f"llmcompressor {version}", "samples": samples, "seq_length": seq,
                      "runs": runs, "eval": ev}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", default=None, help="converted embedded checkpoint (optional)")
    p.add_argument("--samples", type=int, default=None,
                   help="calibration sequences (default 128; 32 with --peer)")
    p.add_argument("--seq-length", type=int, default=512, help="calibration sequence length")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per layer forward (default 8; with --peer prune_oneshot.py's)")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt,sparsegpt+update",
                   help="comma-separated: magnitude, wanda, sparsegpt, sparsegpt+update")
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)  # child process
    p.add_argument("--verbose", action="store_true", help="per-layer progress on stderr")
    p.add_argument("--peer", choices=("llmcompressor",), default=None,
                   help="compare SparseGPT + weight update with this implementation instead")
    p.add_argument("--peer-python", default=sys.executable,
                   help="Python interpreter where the peer is installed")
    p.add_argument("--peer-batch-size", type=int, default=1,
                   help="peer calibration batch size (llm-compressor's default 1)")
    p.add_argument("--repeats", type=int, default=1, help="--peer: timed runs per side")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="--peer: evaluate N held-out windows (default all)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "bench_prune_peer"),
                   help="--peer: dense model, data and pruned models (reused between runs)")
    p.add_argument("--skip-prune", action="store_true",
                   help="--peer: only evaluate the pruned models already in --work-dir (the "
                        "table shows the timings recorded by the run that pruned them)")
    p.add_argument("--skip-eval", action="store_true", help="--peer: timings only")
    ns = p.parse_args()
    if ns.peer:
        compare_with_peer(ns)
        return
    ns.samples = ns.samples or 128
    if ns.method:
        print(json.dumps(run_one(ns)), flush=True)
        return
    results = []
    for method in ns.methods.split(","):
        cmd = [sys.executable, "-W", "ignore", os.path.abspath(__file__), "--method", method,
               "--samples", str(ns.samples), "--seq-length", str(ns.seq_length),
               "--micro-batch-size", str(ns.micro_batch_size or 8)]
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
