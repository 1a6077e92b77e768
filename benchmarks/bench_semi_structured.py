"""Dense vs 2:4 semi-structured sparse matmuls in bf16 on the GPU, for exported model shapes.

For each linear shape (LLaMA-2 7B and the embedded SmolLM2-135M) a random weight is pruned 2:4,
converted with ``torch.sparse.to_sparse_semi_structured`` and timed against the dense matmul on
the same input, side by side (CUDA events, median of --reps). Prints the speedup per shape.

    python benchmarks/bench_semi_structured.py [--tokens 4096] [--reps 50]

2:4 kernels (cuSPARSELt / CUTLASS) exist only on NVIDIA GPUs of compute capability >= 8.0; on
any other machine the script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

SHAPES = {  # name: (out_features, in_features)
    "llama2-7b q/k/v/o_proj": (4096, 4096),
    "llama2-7b gate/up_proj": (11008, 4096),
    "llama2-7b down_proj": (4096, 11008),
    "smollm2-135m q/o_proj": (576, 576),
    "smollm2-135m gate/up_proj": (1536, 576),
    "smollm2-135m down_proj": (576, 1536),
}


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every group of 4 input columns."""
    out, inp = weight.shape
    groups = weight.reshape(out, inp // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(out, inp)


def time_cuda(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096, help="rows of the activation matrix")
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("2:4 semi-structured kernels need an NVIDIA GPU (compute capability >= 8.0); "
              "no CUDA device here, nothing to measure.")
        return 0
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        print(f"GPU compute capability {major}.{minor} < 8.0 has no 2:4 sparse tensor cores.")
        return 0
    from torch.sparse import to_sparse_semi_structured

    print(f"device={torch.cuda.get_device_name()} dtype=bfloat16 tokens={args.tokens} "
          f"reps={args.reps}")
    print(f"{'layer':>28} {'out x in':>12} {'dense ms':>9} {'2:4 ms':>8} {'speedup':>8} "
          f"{'max err':>8}")
    torch.manual_seed(0)
    for name, (out, inp) in SHAPES.items():
        weight = two_four(torch.randn(out, inp, device="cuda", dtype=torch.bfloat16))
        sparse = to_sparse_semi_structured(weight)
        x = torch.randn(args.tokens, inp, device="cuda", dtype=torch.bfloat16)
        err = (torch.nn.functional.linear(x, sparse) - torch.nn.functional.linear(x, weight))
        err = float(err.abs().max())
        t_dense = time_cuda(lambda: torch.nn.functional.linear(x, weight), args.reps)
        t_sparse = time_cuda(lambda: torch.nn.functional.linear(x, sparse), args.reps)
        print(f"{name:>28} {out:>5} x {inp:<5} {t_dense:>9.3f} {t_sparse:>8.3f} "
              f"{t_dense / t_sparse:>7.2f}x {err:>8.2g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
