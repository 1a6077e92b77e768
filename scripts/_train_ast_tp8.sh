#!/usr/bin/env bash
# Shared body of the AST launchers (the paper's LLaMA-2 7B settings, DESIGN "AST"): TP 8, global
# batch 128 x 4096 tokens, 15k steps, lr 2e-5 cosine to 2e-6 after 500 warm-up steps, AdamW
# betas (0.9, 0.95), no weight decay, clip 1, masks recomputed every 10 steps, SR-STE decay
# ramped to 6e-5 over 3000 steps, KD from the frozen dense model (CE 1 + KD 0.5, T 2), SLoRB
# k 16 with a trainable projection. CKPT (dense, or one-shot pruned: its masks start the run),
# DATA, SAVE (required), TEACHER, EVAL_DATA, NPROC, TP, NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT from the environment; extra flags are appended (e.g. --slorb-k 0).
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
require CKPT "a converted (or one-shot pruned) TP=8 checkpoint of ${MODEL_TAG:-the model}"
require DATA "a tokenised .bin/.idx prefix"
require SAVE "the output directory"
TEACHER=${TEACHER:-}
NPROC=${NPROC:-8}
TP=${TP:-8}
EVAL_DATA=${EVAL_DATA:-}
# Slurm preemption: torchrun ignores SIGUSR1; the trainer ranks catch it, checkpoint and exit 0.
trap '' USR1
launch "${MODEL_TAG:-llama2-7b}" \
    torchrun --nproc-per-node "$NPROC" --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
    "$LAUNCH_TOOLS/train_ast.py" \
    --tp "$TP" --load "$CKPT" --data "$DATA" --save "$SAVE" \
    ${TEACHER:+--teacher "$TEACHER"} \
    ${EVAL_DATA:+--eval-data "$EVAL_DATA" --eval-interval 500} \
    --seq-length 4096 --micro-batch-size 1 --global-batch-size 128 --train-iters 15000 \
    --lr 2e-5 --min-lr 2e-6 --warmup-iters 500 \
    --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --weight-decay 0 --clip-grad 1.0 \
    --mask-interval 10 --srste-decay 6e-5 --srste-warmup-iters 3000 --srste-mode adam \
    --ce-weight 1 --kd-weight 0.5 --kd-temperature 2 \
    --slorb-k 16 --slorb-train-projection \
    --save-interval 250 --log-interval 10 "$@"
