"""Compressed 2:4 inference vs dense, both sides interleaved in one run (median over rounds).

1. Single 7B-shape linears (out x in: 4096x4096, 11008x4096, 4096x11008), fp32 and bf16, at
   several batch sizes (tokens): dense ``F.linear(x, W * M)`` vs the 2:4 CPU kernel and vs
   ``SparseLinear24`` (kernel below the measured crossover, dense GEMM above it).
2. The embedded SmolLM2-135M, magnitude-pruned 2:4 (the same masks as convert -> magnitude ->
   export) or an exported ``--model`` dir: decode tokens/s at batch 1 and prefill of 512 tokens,
   dense vs ``sparsify``-ed.
3. With CUDA: bf16 ``to_sparse_semi_structured`` vs dense at 7B MLP shapes, prefill token counts.

    python benchmarks/bench_sparse_inference.py [--reps 7] [--threads 2] [--skip-model]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.timing import interleaved_times, median, median_ratio  # noqa: E402
from megatron.sparse.inference import cpu_kernel  # noqa: E402
from megatron.sparse.inference.format import compress  # noqa: E402
from megatron.sparse.inference.module import SparseLinear24  # noqa: E402

SHAPES_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _magnitude_24(weight: torch.Tensor) -> torch.Tensor:
    rows, cols = weight.shape
    pick = weight.abs().reshape(rows, -1, 4).topk(2, dim=-1).indices
    return torch.zeros(rows, cols // 4, 4, dtype=torch.bool, device=weight.device) \
        .scatter_(-1, pick, True) \
        .reshape(rows, cols).to(weight.dtype) * weight


def bench_linears(batches, reps: int) -> None:
    print("## Single linears (CPU): median ms per call, ratio = dense / ours (> 1: ours faster)")
    print("| shape (out x in) | dtype | batch | dense ms | kernel ms | kernel ratio | "
          "SparseLinear24 ratio |")
    print("|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES_7B:
        base = _magnitude_24(torch.randn(*shape, generator=gen))
        for label, dtype in DTYPES.items():
            weight = base.to(dtype)
            packed = compress(weight)
            module = SparseLinear24(packed=packed)
            for batch in batches:
                x = torch.randn(batch, shape[1], generator=gen).to(dtype)
                fns = {"dense": lambda: F.linear(x, weight),
                       "kernel": lambda: cpu_kernel.matmul(packed, x),
                       "module": lambda: module(x)}
                n = max(3, reps // 2) if batch >= 256 else reps
                t = interleaved_times(fns, n)
                print(f"| {shape[0]}x{shape[1]} | {label} | {batch} | "
                      f"{median(t['dense']) * 1e3:.2f} | {median(t['kernel']) * 1e3:.2f} | "
                      f"{median_ratio(t, 'dense', 'kernel'):.2f} | "
                      f"{median_ratio(t, 'dense', 'module'):.2f} ({module.path(x)}) |",
                      flush=True)


def _models(spec: str | None, dtype: torch.dtype):
    from megatron.sparse.eval.hf_perplexity import load_hf_model
    from megatron.sparse.inference.sparsify import sparsify

    dense = load_hf_model(spec or "embedded", dtype=dtype)
    if spec is None:  # magnitude 2:4 on every projection, as the export of a magnitude prune
        with torch.no_grad():
            for name, mod in dense.named_modules():
                if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                    mod.weight.copy_(_magnitude_24(mod.weight.float()).to(dtype))
    sparse = copy.deepcopy(dense)
    swapped = sparsify(sparse)
    return dense, sparse, len(swapped)


def bench_model(spec: str | None, reps: int, new_tokens: int, prefill: int) -> None:
    from megatron.sparse.inference.generate import greedy_generate, timed_forward

    print(f"\n## {'embedded SmolLM2-135M (magnitude 2:4)' if spec is None else spec}: "
          f"decode at batch 1 ({new_tokens} new tokens), prefill {prefill} tokens")
    print("| dtype | dense decode tok/s | sparse decode tok/s | decode ratio | dense prefill s | "
          "sparse prefill s | prefill ratio | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(1)
    for label, dtype in DTYPES.items():
        dense, sparse, _ = _models(spec, dtype)
        prompt = torch.randint(0, dense.config.vocab_size, (1, 16), generator=gen)
        long = torch.randint(0, dense.config.vocab_size, (1, prefill), generator=gen)
        out = {}

        def decode(name, model):
            def run():
                out[name] = greedy_generate(model, prompt, new_tokens)
                out.setdefault(name + "_s", []).append(out[name].decode_s)
            return run

        interleaved_times({"dense": decode("dense", dense), "sparse": decode("sparse", sparse)},
                          reps)
        per_round = [a / b for a, b in zip(out["dense_s"][1:], out["sparse_s"][1:])]
        steps = new_tokens - 1
        prefill_t = interleaved_times({"dense": lambda: timed_forward(dense, long),
                                       "sparse": lambda: timed_forward(sparse, long)},
                                      max(3, reps // 2))
        print(f"| {label} | {steps / median(out['dense_s'][1:]):.1f} | "
              f"{steps / median(out['sparse_s'][1:]):.1f} | {median(per_round):.2f} | "
              f"{median(prefill_t['dense']):.3f} | {median(prefill_t['sparse']):.3f} | "
              f"{median_ratio(prefill_t, 'dense', 'sparse'):.2f} | "
              f"{out['dense'].tokens == out['sparse'].tokens} |", flush=True)


def bench_gpu(tokens, reps: int) -> None:
    from torch.sparse import to_sparse_semi_structured

    print("\n## GPU bf16: dense vs to_sparse_semi_structured (CUDA events, median ms)")
    print("| shape (out x in) | tokens | dense ms | semi-structured ms | ratio |")
    print("|---|---|---|---|---|")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in [(11008, 4096), (4096, 11008), (4096, 4096)]:
        w = _magnitude_24(torch.randn(*shape, device="cuda", generator=gen)).to(torch.bfloat16)
        ws = to_sparse_semi_structured(w)
        for n in tokens:
            x = torch.randn(n, shape[1], device="cuda", generator=gen).to(torch.bfloat16)
            times = {}
            for name, fn in (("dense", lambda: F.linear(x, w)),
                             ("sparse", lambda: F.linear(x, ws))):
                for _ in range(3):
                    fn()
                samples = []
                for _ in range(reps):
                    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                    start.record()
                    fn()
                    end.record()
                    torch.cuda.synchronize()
                    samples.append(start.elapsed_time(end))
                times[name] = median(samples)
            print(f"| {shape[0]}x{shape[1]} | {n} | {times['dense']:.3f} | "
                  f"{times['sparse']:.3f} | {times['dense'] / times['sparse']:.2f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,3,8,16,32,64,512", help="linear batch sizes")
    p.add_argument("--reps", type=int, default=7, help="interleaved rounds per measurement")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--model", default=None, help="exported HF dir (default: embedded, pruned)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode tokens per round")
    p.add_argument("--prefill", type=int, default=512, help="prefill tokens")
    p.add_argument("--skip-linears", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    ns = p.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    if cpu_kernel.load() is None:
        raise SystemExit("error: the CPU 2:4 kernel did not build (see the warning above)")
    print(f"threads {torch.get_num_threads()}, interleaved rounds {ns.reps}, medians")
    if not ns.skip_linears:
        bench_linears([int(b) for b in ns.batches.split(",")], ns.reps)
    if not ns.skip_model:
        bench_model(ns.model, ns.reps, ns.new_tokens, ns.prefill)
    if torch.cuda.is_available():
        bench_gpu([512, 2048, 4096], 50)
    else:
        print("\nGPU section: no CUDA device here (pending GPU)")


if __name__ == "__main__":
    main()
