#!/usr/bin/env bash
# Zero-shot accuracy of a llama3-8b checkpoint at TP 8 through lm-evaluation-harness on
# the papers' task list (HellaSwag, PIQA, WinoGrande, ARC-e/c, BoolQ, RTE, OpenBookQA; their
# data is downloaded: needs the network or HF_DATASETS_CACHE). TASKS=local scores the offline
# held-out tasks instead. Masks applied when the checkpoint has them.
#
#   CKPT=ckpts/llama3-8b-tp8-sparsegpt OUT=results/llama3-8b-sparsegpt.json \
#       bash scripts/evaluate_zeroshot_llama3_8b.sh [--limit N]
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
require CKPT "a megatron-sparse checkpoint of llama3-8b"
launch llama3-8b torchrun --nproc-per-node "${NPROC:-8}" --master-port "${MASTER_PORT:-29500}" \
    "$LAUNCH_TOOLS/eval_zeroshot.py" --load "$CKPT" \
    --tasks "${TASKS:-hellaswag,piqa,winogrande,arc_easy,arc_challenge,boolq,rte,openbookqa}" \
    --batch-size "${BATCH_SIZE:-8}" --output "${OUT:-zeroshot_llama3_8b.json}" "$@"
