"""Structurally sliced models vs dense, side by side in one run: batch-1 decode and prefill.

The dense checkpoint (default: the converted embedded SmolLM2-135M) is sliced with unit masks
(``--masks`` files from tools/prune_structured.py, or random masks at each ``--keep`` ratio of
attention + MLP parameters: random KV groups and whole blocks per layer, per-layer channel counts
in multiples of 12 around the ratio), every model (dense included) is exported to Hugging Face by
the same path, and the ``transformers`` models are timed interleaved: greedy decode at batch 1 with
the KV cache, and one forward over ``--prefill`` tokens. Ratios are per round, against the dense
model, next to the parameter ratio (attention + MLP) and the per-token matmul FLOP ratio (the LM
head included).

    python benchmarks/bench_structured.py [--load DIR] [--keep 0.8 0.6 | --masks A.npz B.npz]
        [--reps 5] [--threads 2] [--work /tmp/bench_structured]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron.sparse.cli import quiet_library_notices  # noqa: E402

quiet_library_notices()

from benchmarks.timing import interleaved_times, median, median_ratio  # noqa: E402
from megatron.sparse.model import LlamaArgs  # noqa: E402
from megatron.sparse.structured.units import (UnitMasks, attention_params_per_group,  # noqa: E402
                                              full_parameters)


def random_masks(args: LlamaArgs, keep: float, gen: torch.Generator, multiple: int = 12) -> UnitMasks:
    """Random heterogeneous masks keeping about ``keep`` of the attention + MLP parameters."""
    n, g, f, h = args.num_layers, args.num_key_value_heads, args.intermediate_size, args.hidden_size
    groups = (g * keep + torch.randn(n, generator=gen) * 0.6).round().clamp(0, g).long()
    masks = UnitMasks.full(args)
    for i in range(n):
        masks.kv_groups[i] = False
        masks.kv_groups[i, torch.randperm(g, generator=gen)[:groups[i]]] = True
    masks.attention = groups > 0
    attn = int(groups.sum()) * attention_params_per_group(args) + int(masks.attention.sum()) * h
    budget = keep * full_parameters(args) - attn - n * h  # what the channels may use
    share = (keep + (torch.rand(n, generator=gen) - 0.5) * 0.3).clamp(0.05, 1.0)
    width = (share / share.sum() * budget / (3 * h) / multiple).round().clamp(1, f // multiple)
    for i in range(n):
        masks.channels[i] = False
        masks.channels[i, torch.randperm(f, generator=gen)[:int(width[i]) * multiple]] = True
    return masks


def prepare(load: str, masks: dict[str, UnitMasks], work: Path) -> dict[str, Path]:
    """Slice ``load`` by each mask set and export every model (dense too) to HF under ``work``."""
    from megatron.sparse import parallel
    from megatron.sparse.convert.pipeline import convert_megatron_to_hf
    from megatron.sparse.structured.slice import slice_checkpoint

    out = {"dense": work / "hf_dense"}
    with parallel.distributed(1):
        if not out["dense"].exists():
            convert_megatron_to_hf(load, out["dense"], log=lambda *a: None)
        for name, m in masks.items():
            sliced, hf = work / f"sliced_{name}", work / f"hf_{name}"
            if not hf.exists():
                slice_checkpoint(load, m, sliced)
                convert_megatron_to_hf(sliced, hf, log=lambda *a: None)
            out[name] = hf
    return out


def flop_ratio(args: LlamaArgs, masks: UnitMasks) -> tuple[float, float]:
    """(attention + MLP parameter ratio, per-token matmul FLOP ratio with the LM head)."""
    full, kept = full_parameters(args), masks.kept_parameters(args)
    head = args.vocab_size * args.hidden_size
    return kept / full, (kept + head) / (full + head)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", default=None,
                   help="dense checkpoint (default: the embedded model, converted into --work)")
    p.add_argument("--keep", type=float, nargs="+", default=[0.8, 0.6],
                   help="keep ratios of random masks")
    p.add_argument("--masks", nargs="+", default=None, help="unit-mask .npz files instead")
    p.add_argument("--work", default="/tmp/bench_structured", help="scratch directory")
    p.add_argument("--reps", type=int, default=5, help="interleaved rounds")
    p.add_argument("--new-tokens", type=int, default=32, help="decode tokens per round")
    p.add_argument("--prefill", type=int, default=512, help="prefill tokens")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)
    from megatron.sparse import checkpoint as ckpt
    from megatron.sparse.eval.hf_perplexity import load_hf_model
    from megatron.sparse.inference.generate import greedy_generate, timed_forward

    if ns.load is None:
        ns.load = str(Path(ns.work) / "dense")
        if not (Path(ns.load) / "model_args.json").is_file():
            import subprocess

            subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "tools" /
                                                "convert_hf_to_megatron.py"), "--hf", "embedded",
                            "--tp", "1", "--out", ns.load], check=True)
    args = ckpt.read_model_args(ns.load)
    gen = torch.Generator().manual_seed(ns.seed)
    if ns.masks:
        masks = {Path(m).stem: UnitMasks.load(m, args) for m in ns.masks}
    else:
        masks = {f"keep{k:g}": random_masks(args, k, gen) for k in ns.keep}
    work = Path(ns.work)
    work.mkdir(parents=True, exist_ok=True)
    dirs = prepare(ns.load, masks, work)
    models = {name: load_hf_model(str(d)) for name, d in dirs.items()}
    prompt = torch.randint(0, args.vocab_size, (1, 16), generator=gen)
    long = torch.randint(0, args.vocab_size, (1, ns.prefill), generator=gen)
    decode_s: dict[str, list[float]] = {name: [] for name in models}

    def decode(name):
        def run():
            decode_s[name].append(greedy_generate(models[name], prompt, ns.new_tokens).decode_s)
        return run

    interleaved_times({name: decode(name) for name in models}, ns.reps)
    prefill = interleaved_times({name: (lambda m=m: timed_forward(m, long))
                                 for name, m in models.items()}, ns.reps)
    steps = ns.new_tokens - 1
    decode_rounds = {name: s[1:] for name, s in decode_s.items()}  # the warm-up call dropped
    print(f"## {ns.load}: batch-1 decode ({steps} steps) and prefill of {ns.prefill} tokens, "
          f"{ns.threads} threads, median of {ns.reps} interleaved rounds; speedup = dense time "
          f"/ model time")
    print("| model | params (attn+MLP) | param ratio | FLOP ratio (with LM head) | decode tok/s | "
          "decode speedup | prefill s | prefill speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for name in models:
        pr, fr = (1.0, 1.0) if name == "dense" else flop_ratio(args, masks[name])
        kept = full_parameters(args) if name == "dense" else masks[name].kept_parameters(args)
        print(f"| {name} | {kept / 1e6:.2f}M | {pr:.3f} | {fr:.3f} | "
              f"{steps / median(decode_rounds[name]):.1f} | "
              f"{median_ratio(decode_rounds, 'dense', name):.2f} | "
              f"{median(prefill[name]):.3f} | {median_ratio(prefill, 'dense', name):.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
