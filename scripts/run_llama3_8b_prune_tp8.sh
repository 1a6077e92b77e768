#!/usr/bin/env bash
# One-shot 2:4 pruning of llama3-8b at TP 8 with the paper's settings (128 x 4096 calibration tokens).
#
#   CKPT=ckpts/llama3-8b-tp8 CALIB_DATA=data/c4_llama3_8b_text_document \
#   bash scripts/run_llama3_8b_prune_tp8.sh {magnitude,wanda,sparsegpt} [--update-weight]
#
# Output: $SAVE (default ckpts/llama3-8b-tp8-<method>[-update]); NPROC, CALIB_SAMPLES, SEQ_LENGTH
# override the defaults. Extra flags go to tools/prune_oneshot.py (e.g. --bf16).
set -euo pipefail
MODEL_TAG=llama3-8b exec bash "$(dirname "$0")/_prune_tp8.sh" "$@"
