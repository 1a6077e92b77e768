"""One mask-learning step vs one frozen-weight dense forward+backward step, same model and batch.

The dense step trains nothing but the input embedding, so its backward computes every
activation gradient and no weight gradient; the mask step additionally needs the masked weights'
gradients (one GEMM per linear) and the Gumbel-softmax mask math. Both run side by side here,
interleaved rep by rep (the ratio is the median of the per-rep ratios). The GEMM-count floor of
the ratio (exact logit gradients, free mask math) is printed beside it.

With ``--reg-lambda`` the mask step also adds the sparse-weight regulariser, as the trainer does.
With ``--ast`` it times adaptive sparse training instead (benchmarks/ast_step.py): the AST step
without and with the KD teacher forward, and with SLoRB, against a dense full-weight step.

    python benchmarks/bench_train_step.py [--seq-length 2048] [--layers 30] [--reps 3] [--ast]
"""

from __future__ import annotations

import argparse

import torch

from megatron.sparse import parallel
from megatron.sparse.layers import set_mask_state, sparse_layers
from megatron.sparse.model import LlamaArgs, model_forward

from timing import interleaved_times, median, median_ratio  # benchmarks/timing.py

SMOLLM2_135M = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, rope_theta=100000.0,
                    tie_word_embeddings=True, max_position_embeddings=8192)


def gemm_floor(model: LlamaArgs, seq: int) -> float:
    """Ratio of multiply-adds per token, mask step / dense step, with the mask math left out.

    Linears F_lin, core attention F_att (megatron's local attention computes all seq x seq
    scores; its backward costs 2 F_att) and the LM head F_head, per token. Dense step: forward +
    activation gradients + the tied embedding's weight gradient. Mask step: forward + activation
    gradients + the masked weights' gradients.
    """
    h, heads = model.hidden_size, model.num_attention_heads
    kv = model.num_key_value_heads * h // heads
    f_lin = model.num_layers * (h * (h + 2 * kv) + h * h + 3 * h * model.intermediate_size)
    f_att = model.num_layers * 2 * seq * h
    f_head = h * model.vocab_size
    forward = f_lin + f_att + f_head
    dense = forward + (f_lin + 2 * f_att + f_head) + f_head
    mask = forward + (f_lin + 2 * f_att + f_head) + f_lin
    return mask / dense


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--reg-lambda", type=float, default=0.0,
                   help="add -lambda * sum ||sg(W) M||^2 to the mask step's loss (trainer's form)")
    p.add_argument("--ast", action="store_true",
                   help="time the AST step (+ KD, + SLoRB) against a dense full-weight step")
    args = p.parse_args()
    parallel.initialize(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model_args = LlamaArgs(num_layers=args.layers, **SMOLLM2_135M)
    if args.ast:
        import ast_step  # benchmarks/ast_step.py

        print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} "
              f"layers={args.layers} reps={args.reps}")
        ast_step.run(model_args, batch=args.batch, seq=args.seq_length, reps=args.reps,
                     device=device, dtype=dtype)
        parallel.shutdown()
        return
    sparse = model_args.build(sparse=True, params_dtype=dtype, device=device)
    dense = model_args.build(sparse=False, params_dtype=dtype, device=device)
    for m in (sparse, dense):
        for param in m.parameters():
            param.requires_grad_(False)
        m.train()
    for _, layer in sparse_layers(sparse):
        layer.mask_logits.requires_grad_(True)
    dense.embedding.word_embeddings.weight.requires_grad_(True)
    set_mask_state(sparse, tau=4.0, kappa=100.0)
    tokens = torch.randint(0, model_args.vocab_size, (args.batch, args.seq_length + 1),
                           device=device)

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            loss = model_forward(model, tokens[:, :-1], tokens[:, 1:]).float().mean()
            if args.reg_lambda > 0 and model is sparse:
                reg = sum(layer.sparse_weight_norm_sq() for _, layer in sparse_layers(model))
                loss = loss - args.reg_lambda * reg
            loss.backward()
        return run

    samples = interleaved_times({"mask": step(sparse), "dense": step(dense)}, args.reps)
    t_mask, t_dense = median(samples["mask"]), median(samples["dense"])
    n_tok = args.batch * args.seq_length
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} layers={args.layers} "
          f"batch={args.batch} seq={args.seq_length} reps={args.reps} "
          f"reg_lambda={args.reg_lambda}")
    print(f"mask-learning step : {t_mask * 1e3:9.1f} ms  ({n_tok / t_mask:8.0f} tok/s)")
    print(f"dense frozen step  : {t_dense * 1e3:9.1f} ms  ({n_tok / t_dense:8.0f} tok/s)")
    print(f"ratio mask/dense   : {median_ratio(samples, 'mask', 'dense'):.3f}  (target <= 1.15)")
    print(f"GEMM-count floor   : {gemm_floor(model_args, args.seq_length):.3f}  (mask math free)")
    parallel.shutdown()


if __name__ == "__main__":
    main()
