#!/usr/bin/env bash
# WikiText-2 perplexity of a llama2-7b checkpoint at TP 8, seq 4096 (raw test split joined with
# "\n\n", tokenized once, non-overlapping windows). Dense when the checkpoint has no masks.
#
#   CKPT=ckpts/llama2-7b-tp8-sparsegpt bash scripts/evaluate_llama2_7b_wikitext2.sh [--json]
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
require CKPT "a megatron-sparse checkpoint of llama2-7b"
launch llama2-7b torchrun --nproc-per-node "${NPROC:-8}" --master-port "${MASTER_PORT:-29500}" \
    "$LAUNCH_TOOLS/eval_ppl.py" \
    --load "$CKPT" --data "${DATA:-wikitext2}" --seq-length "${SEQ_LENGTH:-4096}" "$@"
