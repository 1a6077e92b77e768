"""One structural-pruning run end to end (what ``tools/prune_structured.py`` calls)."""

from __future__ import annotations

import json
import os
from pathlib import Path


from megatron.sparse import checkpoint as ckpt
from megatron.sparse import parallel
from megatron.sparse.model import LlamaArgs
from megatron.sparse.parallel import print_rank0
from megatron.sparse.structured.config import StructConfig
from megatron.sparse.structured.estimator import check_estimator
from megatron.sparse.structured.init import check_init, wanda_sp_probs
from megatron.sparse.structured.masking import UnitMasker
from megatron.sparse.structured.policy import Budget, KeepProbs, parse_units
from megatron.sparse.structured.estimator import MovingBaseline
from megatron.sparse.structured.trainer import (STATE_FILE, StructuredLearner, load_state,
                                                save_state)
from megatron.sparse.structured.units import UnitMasks, full_parameters

MASK_FILE = "unit_masks.npz"
SUMMARY_FILE = "structured.json"


def check_config(cfg: StructConfig) -> Budget:
    """One-line errors for bad flags; returns the budget."""
    budget = Budget(keep_ratio=cfg.keep_ratio, units=parse_units(cfg.units),
                    block_keep=cfg.block_keep, channel_multiple=cfg.channel_multiple,
                    group_multiple=cfg.group_multiple)
    check_init(cfg.init)
    check_estimator(cfg.estimator)
    if cfg.baseline not in ("moving", "batch"):
        raise ValueError(f"unknown --baseline {cfg.baseline!r}; choose moving or batch")
    if cfg.steps < 0 or cfg.samples_per_step < 1 or cfg.batch_size < 1:
        raise ValueError("--steps must be >= 0, --samples-per-step and --batch-size >= 1")
    if cfg.steps > 0 and cfg.calib_data == "embedded":
        raise ValueError("learning reads batches from a .bin/.idx prefix: pass --calib-data PREFIX "
                         "(tools/preprocess_data.py), 'embedded' only works with --steps 0")
    if cfg.save and os.path.abspath(cfg.save) == os.path.abspath(cfg.load):
        raise ValueError("--save must differ from --load (the dense checkpoint stays untouched)")
    save = Path(cfg.save) if cfg.save else None
    if save and (save / "model_args.json").is_file() and not (save / STATE_FILE).is_file():
        raise ValueError(f"--save {save} already holds a checkpoint that is not a structural "
                         f"pruning run; pass a new directory")
    return budget


def summary(masks: UnitMasks, args: LlamaArgs, cfg: StructConfig) -> dict:
    kept = masks.kept_parameters(args)
    full = full_parameters(args)
    return {"keep_ratio": cfg.keep_ratio, "units": cfg.units, "init": cfg.init,
            "steps": cfg.steps, "kept_parameters": kept, "full_parameters": full,
            "kept_fraction": kept / full, "total_parameters": total_parameters(args, masks),
            "dense_total_parameters": total_parameters(args, UnitMasks.full(args)),
            "kv_groups_per_layer": masks.kv_groups_per_layer().tolist(),
            "channels_per_layer": masks.channels_per_layer().tolist()}


def masked_ppl(model, args: LlamaArgs, masks: UnitMasks, meta: dict, cfg: StructConfig) -> dict:
    """Held-out PPL of the model with ``masks`` applied by the masking hooks."""
    from megatron.sparse.data.tokenizer import load_tokenizer
    from megatron.sparse.eval.datasets import eval_windows
    from megatron.sparse.eval.perplexity import megatron_perplexity

    windows = eval_windows(cfg.eval_data, load_tokenizer(meta["tokenizer"]),
                           seq_length=cfg.eval_seq_length, max_windows=cfg.eval_windows)
    masker = UnitMasker(model, args)
    try:
        masker.set(masks)
        return megatron_perplexity(model, windows).to_dict()
    finally:
        masker.remove()


def run_structured(cfg: StructConfig, *, tp: int, eval_masks: str | None = None) -> UnitMasks:
    budget = check_config(cfg)
    meta = ckpt.read_checkpoint_meta(cfg.load)
    args = LlamaArgs.from_dict(meta["model"])
    args.validate(tp)
    if cfg.eval_data and not meta.get("tokenizer"):
        raise ValueError(f"{cfg.load} records no tokenizer; cannot tokenize --eval-data")
    given = UnitMasks.load(eval_masks, args) if eval_masks else None
    save = Path(cfg.save) if cfg.save else None
    resumed = load_state(save / STATE_FILE, args, cfg) if save and not given else None
    parallel.initialize(tp, seed=cfg.seed)
    try:
        model, _ = ckpt.load_model(cfg.load)
        model.eval()
        if given is not None:
            masks = given
        else:
            masks = _learn(model, args, cfg, budget, meta, resumed)
        info = summary(masks, args, cfg)
        if cfg.eval_data:
            info["eval"] = {"data": cfg.eval_data, **masked_ppl(model, args, masks, meta, cfg)}
        print_rank0(f"kept {info['kept_parameters']} of {info['full_parameters']} attention + MLP "
                    f"parameters ({info['kept_fraction']:.4f}); KV groups per layer "
                    f"{info['kv_groups_per_layer']}; MLP width per layer "
                    f"{info['channels_per_layer']}"
                    + (f"; PPL {info['eval']['ppl']:.4f} on {cfg.eval_data}" if cfg.eval_data
                       else ""))
        if save and given is None:
            if parallel.is_main():
                masks.save(save / MASK_FILE)
            if cfg.slice:
                from megatron.sparse.structured.slice import slice_checkpoint

                slice_checkpoint(cfg.load, masks, save)
            if parallel.is_main():
                tmp = save / (SUMMARY_FILE + ".tmp")
                tmp.write_text(json.dumps(info, indent=2))
                tmp.replace(save / SUMMARY_FILE)
            print_rank0(f"saved {save / MASK_FILE}" + (f" and the sliced checkpoint {save}"
                                                             if cfg.slice else ""))
        return masks
    finally:
        parallel.shutdown()


def total_parameters(args: LlamaArgs, masks: UnitMasks) -> int:
    """Every parameter of the sliced model: kept layers + embeddings, final norm, output layer."""
    outside = args.vocab_size * args.hidden_size * (1 if args.tie_word_embeddings else 2)
    return masks.kept_parameters(args) + outside + args.hidden_size


def _learn(model, args, cfg, budget, meta, resumed) -> UnitMasks:
    if resumed is not None:
        probs, baseline, step = resumed
        print_rank0(f"resumed at step {step}")
    else:
        baseline, step = None, 0
        if cfg.init == "wanda-sp":
            from megatron.sparse.prune.data import calibration_windows

            windows = calibration_windows(cfg.calib_data, tokenizer_spec=meta.get("tokenizer"),
                                          seq_length=cfg.calib_seq_length,
                                          num_samples=cfg.calib_samples,
                                          vocab_size=args.vocab_size)
            probs = wanda_sp_probs(model, args, windows, budget)
        else:
            probs = KeepProbs.uniform(args, budget)
        if cfg.save:
            save_state(Path(cfg.save) / STATE_FILE, probs, MovingBaseline(cfg.baseline_alpha), 0,
                       cfg)
    if cfg.steps > step:
        from megatron.sparse.train.data import TrainBatches

        data = TrainBatches(prefix=cfg.calib_data, seq_length=cfg.seq_length,
                            micro_batch_size=cfg.batch_size, global_batch_size=cfg.batch_size,
                            train_iters=cfg.steps, seed=cfg.seed, vocab_size=args.vocab_size)
        learner = StructuredLearner(model=model, args=args, cfg=cfg, budget=budget, probs=probs,
                                    data=data, baseline=baseline, step=step)
        probs = learner.run()
    return probs.final_masks(args, budget)
