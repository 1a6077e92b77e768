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
        [--samples 32] [--seq-length 512] [--draws 3] [--repeats 1] [--work-dir DIR]

compares our SparseGPT + weight update with llm-compressor's on the same calibration windows and
one evaluator (see benchmarks/prune_vs_peer.py), on ``--draws`` disjoint sets of windows (the
PPL of a 2:4 model moves by a few percent with its calibration windows, more than the two
implementations differ by; the mean over draws is the comparison). llm-compressor pins its own
transformers, so it usually lives in a separate venv. Without llm-compressor in
``--peer-python`` the peer is skipped with a message.
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


def _peer_draw(ns: argparse.Namespace, paths: dict, work: Path, *, offset: int,
               heldout) -> dict:
    """One calibration draw: both sides prune (``ns.repeats`` times, alternating order) on the
    windows that start ``offset`` windows in, then one evaluator scores both. Cached in
    ``work/draw_o{offset}/`` so an interrupted comparison resumes."""
    import prune_vs_peer as peer

    samples, seq = ns.samples, ns.seq_length
    out = work / f"draw_o{offset}"
    record_file = out / f"record_{samples}x{seq}.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    if not record.get("runs") and ns.skip_prune:
        raise SystemExit(f"--skip-prune: no pruned models recorded in {out}; run without it")
    if not record.get("runs"):
        tokens = peer.draw_tokens(paths, out, samples=samples, seq_length=seq, offset=offset)
        sides = [lambda: peer.run_ours(paths, out, samples=samples, seq_length=seq,
                                       offset=offset, micro_batch_size=ns.micro_batch_size),
                 lambda: peer.run_peer(paths, out, tokens=tokens, peer_python=ns.peer_python,
                                       batch_size=ns.peer_batch_size)]
        record = {"offset": offset, "runs": []}
        for repeat in range(ns.repeats):
            order = sides if (repeat + offset // samples) % 2 == 0 else sides[::-1]
            rows = {row["side"]: row for row in (run() for run in order)}
            record["runs"].append(rows)
            print(f"draw at window {offset}, run {repeat + 1}: ours {rows['ours']['seconds']:.1f}"
                  f" s, {rows['ours']['peak_rss_mib']} MiB; llmcompressor "
                  f"{rows['llmcompressor']['seconds']:.1f} s, "
                  f"{rows['llmcompressor']['peak_rss_mib']} MiB", flush=True)
        record_file.write_text(json.dumps(record))
    if not ns.skip_eval and "eval" not in record:
        record["eval"] = peer.evaluate(out, heldout)
        record_file.write_text(json.dumps(record))
        ev = record["eval"]
        print(f"draw at window {offset}: PPL ours {ev['ppl_ours']:.3f}, llmcompressor "
              f"{ev['ppl_llmcompressor']:.3f}; masks agree on {ev['mask_agreement']:.1%}",
              flush=True)
    return record


def _spread(values: list[float]) -> str:
    """Mean, and min-max over draws when there are several."""
    mean = sum(values) / len(values)
    return f"{mean:.3f}" + (f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else "")


def compare_with_peer(ns: argparse.Namespace) -> None:
    """Ours vs the peer on ``--draws`` disjoint calibration draws; prints the three ratios."""
    import prune_vs_peer as peer  # benchmarks/ is on sys.path when run as a script

    version = peer.peer_available(ns.peer_python)
    if version is None:
        print(f"skipping the llmcompressor comparison: llmcompressor is not installed in "
              f"{ns.peer_python} (pip install llmcompressor there, then pass --peer-python)")
        return
    from megatron.sparse.cli import quiet_library_notices

    quiet_library_notices()
    ns.samples = ns.samples or 32
    samples, seq = ns.samples, ns.seq_length
    work = Path(ns.work_dir)
    paths = peer.prepare(work)
    heldout = dense_ppl = None
    if not ns.skip_eval:
        heldout = peer.heldout_windows(paths, seq_length=seq, max_windows=ns.eval_windows)
        dense_ppl, _ = peer.hf_ppl(paths["hf_dense"], heldout)
    records = [_peer_draw(ns, paths, work, offset=ns.calib_offset + d * samples, heldout=heldout)
               for d in range(ns.draws)]
    if ns.skip_eval:
        print(json.dumps({"peer": f"llmcompressor {version}", "draws": records}))
        return
    print(f"\nSparseGPT + weight update, 2:4, {samples} x {seq} calibration tokens per draw (both "
          f"sides the same windows), llmcompressor {version}; PPL on held-out embedded text, "
          f"{heldout.shape[0]} x {seq} windows, one evaluator (dense {dense_ppl:.2f})")
    print(f"{'window':>6} {'run':>3} {'ours s':>7} {'peer s':>7} {'time':>5} {'ours MiB':>8} "
          f"{'peer MiB':>8} {'memory':>6} {'ours PPL':>9} {'peer PPL':>9} {'PPL':>6} {'masks':>6}")
    ratios = {"time": [], "memory": [], "ppl": []}
    for record in records:
        ev = record["eval"]
        ppl = ev["ppl_ours"] / ev["ppl_llmcompressor"]
        ratios["ppl"].append(ppl)
        for i, rows in enumerate(record["runs"]):
            o, q = rows["ours"], rows["llmcompressor"]
            ratios["time"].append(o["seconds"] / q["seconds"])
            ratios["memory"].append(o["peak_rss_mib"] / q["peak_rss_mib"])
            print(f"{record['offset']:>6} {i + 1:>3} {o['seconds']:7.1f} {q['seconds']:7.1f} "
                  f"{ratios['time'][-1]:5.2f} {o['peak_rss_mib']:8d} {q['peak_rss_mib']:8d} "
                  f"{ratios['memory'][-1]:6.2f} {ev['ppl_ours']:9.3f} "
                  f"{ev['ppl_llmcompressor']:9.3f} {ppl:6.3f} {ev['mask_agreement']:6.1%}")
    print("ours/peer over all draws, mean (min-max): " + ", ".join(
        f"{name} {_spread(values)}" for name, values in ratios.items()))
    intervals = {}
    if len(records) > 1:
        from draw_stats import ratio_interval

        intervals = {name: ratio_interval(values) for name, values in ratios.items()}
        print(f"geometric mean and 95 % t interval over {len(records)} draws: " + ", ".join(
            f"{name} {g:.3f} [{lo:.3f}, {hi:.3f}]" for name, (g, lo, hi) in intervals.items()))
    print("time and peak RSS are whole processes (load + calibrate + prune + save, no evaluation)")
    print(json.dumps({"peer": f"llmcompressor {version}", "samples": samples, "seq_length": seq,
                      "dense_ppl": dense_ppl, "draws": records,
                      "mean_ratios": {k: sum(v) / len(v) for k, v in ratios.items()},
                      "ratio_intervals_95": intervals}))


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
    p.add_argument("--repeats", type=int, default=1, help="--peer: timed runs per side per draw")
    p.add_argument("--draws", type=int, default=1,
                   help="--peer: disjoint calibration draws (draw d starts --calib-offset + d x "
                        "--samples windows in); the table gives each and the mean ratios")
    p.add_argument("--calib-offset", type=int, default=0,
                   help="--peer: window where the first draw starts")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="--peer: evaluate N held-out windows (default all)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "bench_prune_peer"),
                   help="--peer: dense model, data and pruned models (reused between runs)")
    p.add_argument("--skip-prune", action="store_true",
                   help="--peer: only evaluate the pruned models already in --work-dir (the "
                        "table shows the timings recorded by the run that pruned them); a draw "
                        "already recorded there is never pruned again")
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
