#!/usr/bin/env bash
# Shared body of the MaskLLM launchers (the paper's settings): TP 8, global batch 256 x 4096
# tokens, 2000 iterations, tau 4 -> 0.05, kappa 1e2 -> 5e2, lambda 1e-5, lr 5e-5 (x10 on the
# logits), SparseGPT prior at strength 3. CKPT, DATA, SAVE (required), PRIOR, EVAL_DATA, NPROC,
# TP, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT from the environment; extra flags are appended.
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
require CKPT "a converted TP=8 checkpoint of ${MODEL_TAG:-the model}"
require DATA "a tokenised .bin/.idx prefix"
require SAVE "the output directory"
PRIOR=${PRIOR:-}
NPROC=${NPROC:-8}
TP=${TP:-8}
EVAL_DATA=${EVAL_DATA:-}
# Slurm preemption: torchrun ignores SIGUSR1; the trainer ranks catch it, checkpoint and exit 0.
trap '' USR1
launch "${MODEL_TAG:-llama2-7b}" \
    torchrun --nproc-per-node "$NPROC" --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
    "$LAUNCH_TOOLS/train_mask.py" \
    --tp "$TP" --load "$CKPT" --data "$DATA" --save "$SAVE" \
    ${PRIOR:+--prior "$PRIOR" --prior-strength 3} \
    ${EVAL_DATA:+--eval-data "$EVAL_DATA" --eval-interval 200} \
    --seq-length 4096 --micro-batch-size 1 --global-batch-size 256 --train-iters 2000 \
    --tau-start 4 --tau-end 0.05 --kappa-start 100 --kappa-end 500 --reg-lambda 1e-5 \
    --lr 5e-5 --min-lr 5e-6 --warmup-iters 0 --logits-lr-mult 10 \
    --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 \
    --save-interval 100 --log-interval 10 "$@"
