"""Forward+backward time of a sparse layer (soft Gumbel masks) vs megatron's dense layer.

Both layers run side by side in one process on the same input, interleaved rep by rep; times are
medians and ratios the median of the per-rep ratios. The sparse layer computes the
masked weight's gradient (needed for the mask logits), so its fair dense reference is the
dense layer *with* a trainable weight; the frozen-weight dense time is printed for context.

    python benchmarks/bench_sparse_linear.py [--tokens 512 2048] [--shapes 576x1536 4096x11008]
"""

from __future__ import annotations

import argparse

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear

from megatron.sparse import parallel
from megatron.sparse.layers import SparseColumnParallelLinear
from megatron.sparse.model import LlamaArgs

from timing import interleaved_times, median, median_ratio  # benchmarks/timing.py


def _step(layer, x):
    def run():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        out, _ = layer(x)
        out.backward(torch.ones_like(out))
    return run


def bench_shape(in_f: int, out_f: int, tokens: int, *, reps: int, dtype, device) -> dict:
    config = LlamaArgs(hidden_size=in_f, num_layers=1, num_attention_heads=1,
                       num_key_value_heads=1, intermediate_size=out_f, vocab_size=8
                       ).transformer_config(tp_size=1, params_dtype=dtype)
    init = torch.nn.init.normal_
    sparse = SparseColumnParallelLinear(in_f, out_f, config=config, init_method=init,
                                        bias=False).to(device)
    dense = ColumnParallelLinear(in_f, out_f, config=config, init_method=init,
                                 bias=False).to(device)
    frozen = ColumnParallelLinear(in_f, out_f, config=config, init_method=init,
                                  bias=False).to(device)
    frozen.weight.requires_grad_(False)
    sparse.train()
    x = torch.randn(tokens, 1, in_f, dtype=dtype, device=device, requires_grad=True)
    samples = interleaved_times({"sparse": _step(sparse, x), "dense": _step(dense, x),
                                 "frozen": _step(frozen, x)}, reps)
    times = {name: median(values) for name, values in samples.items()}
    times["sparse/dense"] = median_ratio(samples, "sparse", "dense")
    times["sparse/frozen"] = median_ratio(samples, "sparse", "frozen")
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--shapes", nargs="+", default=["576x1536", "4096x11008"],
                   help="IN x OUT of the linear layer")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on GPU, float32 on CPU")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    parallel.initialize(1)
    from megatron.sparse import cpu_kernels

    fused = device == "cpu" and dtype == torch.float32 and cpu_kernels.load() is not None
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} reps={args.reps} "
          f"mask path={'fused CPU kernel' if fused else 'PyTorch ops'}")
    print(f"{'shape':>12} {'tokens':>6} {'sparse ms':>10} {'dense ms':>9} {'frozen ms':>9} "
          f"{'sparse/dense':>12} {'sparse/frozen':>13}")
    for shape in args.shapes:
        in_f, out_f = (int(v) for v in shape.lower().split("x"))
        for tokens in args.tokens:
            t = bench_shape(in_f, out_f, tokens, reps=args.reps, dtype=dtype, device=device)
            print(f"{shape:>12} {tokens:>6} {t['sparse'] * 1e3:>10.1f} {t['dense'] * 1e3:>9.1f} "
                  f"{t['frozen'] * 1e3:>9.1f} {t['sparse/dense']:>12.3f} "
                  f"{t['sparse/frozen']:>13.3f}", flush=True)
    parallel.shutdown()


if __name__ == "__main__":
    main()
