#!/usr/bin/env python
"""The llm-compressor side of ``benchmarks/bench_prune.py --peer llmcompressor``.

    PEER_PYTHON benchmarks/peer_llmcompressor.py --model HF_DIR --tokens calib.npy --out DIR

Runs in the peer's own environment (llm-compressor pins its own transformers), so it imports
nothing of megatron-sparse. Loads the dense Hugging Face model, runs ``oneshot`` with
``SparseGPTModifier(sparsity=0.5, mask_structure="2:4", dampening_frac=0.01, block_size=128)``
through the sequential pipeline on exactly the ``[n, L]`` token windows of ``--tokens`` (no
shuffling, no truncation, no padding), and writes the pruned weights as plain safetensors next to
a copy of the dense model's config and tokenizer. Prints one JSON line: seconds per stage and
the process's peak RSS.
``--check`` only tests that llm-compressor is installed (exit 0) or not (exit 3).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="dense Hugging Face model directory")
    p.add_argument("--tokens", help=".npy file of [n, L] int64 calibration token windows")
    p.add_argument("--out", help="output directory for the pruned model")
    p.add_argument("--batch-size", type=int, default=1, help="calibration batch size")
    p.add_argument("--check", action="store_true", help="only check that llm-compressor imports")
    ns = p.parse_args()
    start = time.perf_counter()
    if ns.check:  # without importing it (that alone takes a minute on a loaded machine)
        import importlib.metadata
        import importlib.util

        if importlib.util.find_spec("llmcompressor") is None:
            print("llmcompressor is not installed in this Python", file=sys.stderr)
            sys.exit(3)
        print(json.dumps({"llmcompressor": importlib.metadata.version("llmcompressor")}))
        return
    import llmcompressor
    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    times = {"import": time.perf_counter() - start}
    t = time.perf_counter()
    tokens = np.load(ns.tokens, allow_pickle=False)
    if tokens.ndim != 2:
        raise SystemExit(f"{ns.tokens}: expected [n, L] token windows, got shape {tokens.shape}")
    rows = tokens.astype(np.int64).tolist()
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    model = AutoModelForCausalLM.from_pretrained(ns.model, dtype=torch.float32).eval()
    times["load"] = time.perf_counter() - t
    t = time.perf_counter()
    recipe = SparseGPTModifier(sparsity=0.5, mask_structure="2:4", dampening_frac=0.01,
                               block_size=128, targets=["Linear"], ignore=["re:.*lm_head"])
    oneshot(model=model, dataset=dataset, recipe=recipe, pipeline="sequential",
            num_calibration_samples=tokens.shape[0], max_seq_length=tokens.shape[1],
            shuffle_calibration_samples=False, batch_size=ns.batch_size)
    times["prune"] = time.perf_counter() - t
    t = time.perf_counter()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(ns.model).iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")) \
                and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    save_model(model, str(out / "model.safetensors"))
    times["save"] = time.perf_counter() - t
    print(json.dumps({"side": "llmcompressor", "version": llmcompressor.__version__,
                      "stage_seconds": {k: round(v, 2) for k, v in times.items()},
                      "threads": torch.get_num_threads(), "batch_size": ns.batch_size,
                      "peak_rss_mib": round(peak_rss_mib())}), flush=True)


if __name__ == "__main__":
    main()
