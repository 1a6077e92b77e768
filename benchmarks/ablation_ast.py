"""AST ablation on the embedded model at the demo's MaskLLM token budget (docs/results.md).

Rows: SparseGPT (+ weight update), MaskLLM and MaskLLM + KD (the demo's recipe), and AST from
the SparseGPT + update checkpoint: naive (no KD), + KD, + KD + SLoRB, + KD + SLoRB with the
decay in the gradient (``--srste-mode gradient``), and + KD + SLoRB with the paper's GPT-2 loss
weights (CE 0.33, KD 0.67) instead of its LLaMA ones (1, 0.5). Every run sees the same 40 steps
x 4 x 256 tokens of the training split; PPL is the held-out protocol of the demo (40 windows of
256).
It reuses the demo's work directory (conversion, data, one-shot checkpoints) and skips runs
that exist.

    python benchmarks/ablation_ast.py [--work-dir runs/demo] [--only ast,ast_kd]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron.sparse.demo import DemoConfig, Pipeline  # noqa: E402

AST_RUNS = {  # name -> extra flags of tools/train_ast.py
    "ast": ["--kd-weight", "0"],
    "ast_kd": ["--kd-weight", "0.5"],
    "ast_kd_slorb": ["--kd-weight", "0.5", "--slorb-k", "16", "--slorb-train-projection"],
    "ast_kd_slorb_gradient": ["--kd-weight", "0.5", "--slorb-k", "16",
                              "--slorb-train-projection", "--srste-mode", "gradient"],
    # the paper's GPT-2 (124M) weights, for a model of that size: CE 0.33, KD 0.67
    "ast_kd67_slorb": ["--ce-weight", "0.33", "--kd-weight", "0.67", "--slorb-k", "16",
                       "--slorb-train-projection"],
}
MASKLLM_RUNS = {"maskllm": ["--kd-weight", "0"], "maskllm_kd": ["--kd-weight", "0.5"]}


def _flags(pairs: dict) -> list[str]:
    return [item for key, value in pairs.items() for item in (f"--{key}", str(value))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="runs/demo")
    p.add_argument("--only", default="", help="comma-separated subset of the run names")
    ns = p.parse_args()
    cfg = DemoConfig(work_dir=ns.work_dir)
    pipe = Pipeline(cfg)
    dense = pipe.convert()
    data = pipe.preprocess()
    sgpt, sgpt_update = pipe.prune(dense, data, "sparsegpt"), pipe.prune(dense, data,
                                                                        "sparsegpt", True)
    common = {"data": data, "eval-data": "embedded", "eval-windows": cfg.eval_windows,
              "seq-length": cfg.seq_length, "micro-batch-size": 1,
              "global-batch-size": cfg.global_batch_size, "train-iters": cfg.train_iters,
              "log-interval": 4}
    chosen = set(filter(None, ns.only.split(","))) or set(AST_RUNS) | set(MASKLLM_RUNS)
    rows = [("dense", pipe.ppl(dense)), ("SparseGPT", pipe.ppl(sgpt)),
            ("SparseGPT + update", pipe.ppl(sgpt_update))]
    for name, extra in MASKLLM_RUNS.items():
        if name not in chosen:
            continue
        out = pipe.root / "ablation" / name
        if not (out / "latest_checkpointed_iteration.txt").is_file():
            pipe.tool("train_mask", *_flags({
                **common, "load": dense, "prior": sgpt, "prior-strength": cfg.prior_strength,
                "save": out, "lr": cfg.lr, "min-lr": cfg.lr / 10, "adam-eps": cfg.adam_eps,
                "logits-lr-mult": 1, "weight-decay": 0, "tau-start": cfg.tau_start,
                "tau-end": cfg.tau_end, "kappa-start": cfg.kappa_start,
                "kappa-end": cfg.kappa_end, "reg-lambda": cfg.reg_lambda}), *extra)
        rows.append((name, pipe.learned_ppl(out)))
    for name, extra in AST_RUNS.items():
        if name not in chosen:
            continue
        out = pipe.root / "ablation" / name
        if not (out / "latest_checkpointed_iteration.txt").is_file():
            pipe.tool("train_ast", *_flags({
                **common, "load": sgpt_update, "save": out, "lr": cfg.ast_lr,
                "min-lr": cfg.ast_lr / 10, "warmup-iters": 4,
                "srste-decay": cfg.ast_srste_decay,
                "srste-warmup-iters": cfg.train_iters // 4}), *extra)
        rows.append((name, pipe.learned_ppl(out)))
    base = dict(rows)
    print(f"| run | held-out PPL (seq {cfg.seq_length}) | (PPL - dense) / (SparseGPT - dense) |")
    print("|---|---|---|")
    for name, ppl in rows:
        ratio = (ppl - base["dense"]) / (base["SparseGPT"] - base["dense"])
        print(f"| {name} | {ppl:.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
