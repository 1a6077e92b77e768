#!/usr/bin/env bash
# WikiText-2 perplexity of a llama3.1-8b checkpoint at TP 8, seq 4096 (raw test split joined with
# "\n\n", tokenized once, non-overlapping windows). Dense when the checkpoint has no masks.
#
#   CKPT=ckpts/llama3.1-8b-tp8-sparsegpt bash scripts/evaluate_llama3.1_8b_wikitext2.sh [--json]
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
require CKPT "a megatron-sparse checkpoint of llama3.1-8b"
launch llama3.1-8b torchrun --nproc-per-node "${NPROC:-8}" --master-port "${MASTER_PORT:-29500}" \
    "$LAUNCH_TOOLS/eval_ppl.py" \
    --load "$CKPT" --data "${DATA:-wikitext2}" --seq-length "${SEQ_LENGTH:-4096}" "$@"
