#!/usr/bin/env python
"""One-shot 2:4 pruning of a megatron-sparse checkpoint (magnitude, Wanda, SparseGPT).

    torchrun --nproc-per-node TP tools/prune_oneshot.py --load DENSE --method sparsegpt \\
        --calib-data PREFIX|embedded --calib-samples 128 --seq-length 4096 --save OUT

Layers are pruned one after another on calibration activations that went through the already
pruned layers; each TP rank prunes its own shard. The masks are stored as fixed 2:4 choices (one
uint8 per group of 4 weights, ``mask_storage: fixed``), so eval and export apply them as is and
tools/train_mask.py uses them as its prior; with --update-weight (SparseGPT only) the compensated
weights are saved too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron.sparse.cli import quiet_library_notices, run_main  # noqa: E402

quiet_library_notices()  # megatron-core warns at import time

import torch  # noqa: E402

from megatron.sparse.prune.calibration import METHODS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load", required=True, help="dense (converted) megatron-sparse checkpoint")
    p.add_argument("--method", required=True, choices=METHODS, help="pruning method")
    p.add_argument("--update-weight", action="store_true",
                   help="SparseGPT: also save the OBS-compensated weights")
    p.add_argument("--calib-data", default=None,
                   help="'embedded' or the prefix of a tokenized .bin/.idx dataset (not needed "
                        "for magnitude)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration sequences")
    p.add_argument("--calib-offset", type=int, default=0,
                   help="skip this many windows of --calib-data first (a disjoint draw)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="calibration sequence length (not needed for magnitude)")
    p.add_argument("--save", required=True, help="output checkpoint directory")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel size (default: the number of torchrun ranks)")
    p.add_argument("--micro-batch-size", type=int, default=4,
                   help="calibration sequences per layer forward")
    p.add_argument("--block-size", type=int, default=128, help="SparseGPT column block size")
    p.add_argument("--percdamp", type=float, default=0.01,
                   help="SparseGPT dampening, fraction of the mean Hessian diagonal")
    p.add_argument("--local-row-hessian", action="store_true",
                   help="SparseGPT under TP: use each rank's block-diagonal Hessian for "
                        "linear_proj/linear_fc2 instead of gathering the full one (faster, "
                        "masks then depend on the TP size)")
    p.add_argument("--bf16", action="store_true", help="hold the model in bfloat16")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    ns = parse_args(argv)
    from megatron.sparse import checkpoint as ckpt
    from megatron.sparse import parallel
    from megatron.sparse.heap import trim_heap
    from megatron.sparse.layers import sparse_layers
    from megatron.sparse.model import LlamaArgs
    from megatron.sparse.prune.calibration import check_method, peak_memory_mib, prune_model
    from megatron.sparse.prune.data import calibration_windows

    check_method(ns.method, ns.update_weight)
    if ns.method != "magnitude" and not ns.calib_data:
        raise ValueError(f"--method {ns.method} needs --calib-data (PREFIX or embedded)")
    if ns.method != "magnitude" and not ns.seq_length:
        raise ValueError(f"--method {ns.method} needs --seq-length (the calibration length)")
    if os.path.abspath(ns.save) == os.path.abspath(ns.load):
        raise ValueError("--save must differ from --load (the dense checkpoint stays untouched)")
    meta = ckpt.read_checkpoint_meta(ns.load)
    args = LlamaArgs.from_dict(meta["model"])
    tp = ns.tp or int(os.environ.get("WORLD_SIZE", 1))
    args.validate(tp, two_four=True)
    parallel.initialize(tp)
    try:
        start = time.perf_counter()
        windows = None
        if ns.method != "magnitude":
            windows = calibration_windows(ns.calib_data, tokenizer_spec=meta.get("tokenizer"),
                                          seq_length=ns.seq_length, num_samples=ns.calib_samples,
                                          vocab_size=args.vocab_size, offset=ns.calib_offset)
        if ns.seq_length and ns.seq_length > args.max_position_embeddings:
            raise ValueError(f"--seq-length {ns.seq_length} exceeds the model's "
                             f"max_position_embeddings ({args.max_position_embeddings})")
        from megatron.sparse.compat import default_device

        model, _ = ckpt.load_model(ns.load, mask_kind="fixed", with_masks=False,
                                   params_dtype=torch.bfloat16 if ns.bf16 else torch.float32,
                                   device=default_device())
        parallel.print_rank0(f"pruning {ns.load} with {ns.method}"
                             f"{' + weight update' if ns.update_weight else ''} at TP={tp}"
                             + ("" if windows is None else
                                f" on {windows.shape[0]} x {windows.shape[1]} calibration tokens"))
        masks = prune_model(model, windows if windows is not None else torch.empty(0, 0),
                            method=ns.method, update_weight=ns.update_weight,
                            micro_batch_size=ns.micro_batch_size, block_size=ns.block_size,
                            percdamp=ns.percdamp, full_row_hessian=not ns.local_row_hessian,
                            return_masks=False, log=parallel.print_rank0)
        elapsed = time.perf_counter() - start
        out_meta = {k: v for k, v in meta.items() if k != "model"}
        out_meta.update(
            mask_source=ns.method, weights_updated=bool(ns.update_weight),
            base_checkpoint=meta.get("base_checkpoint", os.path.abspath(ns.load)),
            pruning={"method": ns.method, "update_weight": bool(ns.update_weight),
                     "calib_data": ns.calib_data, "calib_samples": ns.calib_samples,
                     "calib_offset": ns.calib_offset,
                     "seq_length": ns.seq_length, "block_size": ns.block_size,
                     "percdamp": ns.percdamp, "full_row_hessian": not ns.local_row_hessian,
                     "tp": tp, "seconds": round(elapsed, 1)})
        num_pruned = len(masks)
        del masks  # the masks live in the layers; free the cached mask tensors before the save
        for _, layer in sparse_layers(model):
            layer.drop_mask_cache()
        trim_heap()
        ckpt.save_checkpoint(ns.save, model, iteration=0, args=args, meta=out_meta)
        peak = torch.tensor([peak_memory_mib()], device=next(model.parameters()).device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        parallel.print_rank0(f"pruned {num_pruned} linears per rank in {elapsed:.1f}s, peak memory "
                             f"{float(peak):.0f} MiB per rank; saved {ns.save}")
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    run_main(main)
