#!/usr/bin/env python
"""Greedy generation from a Hugging Face model, dense or with compressed 2:4 kernels; prints the
text and decode tokens/s.

    python tools/generate.py --model hf/smollm2-2of4 --sparse-kernels --prompt "The capital of"
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron.sparse.cli import quiet_library_notices, run_main  # noqa: E402

quiet_library_notices()

DTYPES = ("float32", "bfloat16", "float16")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model directory or 'embedded'")
    p.add_argument("--mask", default=None, help="packed 2:4 mask file (masks.npz) to apply")
    p.add_argument("--sparse-kernels", action="store_true",
                   help="run the 2:4 linears compressed (CPU kernel / GPU semi-structured)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: --model)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ns = p.parse_args()
    if ns.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {ns.max_new_tokens}")
    import torch

    from megatron.sparse.data.tokenizer import encode, load_tokenizer
    from megatron.sparse.inference.generate import greedy_generate, load_for_inference

    if ns.threads:
        torch.set_num_threads(ns.threads)
    tokenizer = load_tokenizer(ns.tokenizer or ns.model)
    model, swapped = load_for_inference(ns.model, mask_file=ns.mask,
                                        sparse_kernels=ns.sparse_kernels,
                                        dtype=getattr(torch, ns.dtype), device=ns.device)
    ids = encode(tokenizer, ns.prompt)
    if not ids:
        raise ValueError("--prompt encodes to no tokens")
    prompt = torch.tensor([ids], device=ns.device)
    gen = greedy_generate(model, prompt, ns.max_new_tokens,
                          eos_token_id=getattr(tokenizer, "eos_token_id", None))
    print(ns.prompt + tokenizer.decode(gen.tokens))
    kind = f"2:4 kernels on {len(swapped)} linears" if ns.sparse_kernels else "dense"
    print(f"[{kind}, {ns.dtype}] prefill {len(ids)} tokens {gen.prefill_s:.3f} s; "
          f"{len(gen.tokens)} new tokens; decode {gen.decode_tokens_per_s:.2f} tokens/s")


if __name__ == "__main__":
    run_main(main)
