#!/usr/bin/env bash
# MaskLLM on LLaMA-3 8B with the paper's settings (see _train_mask_tp8.sh). Re-running the same
# command resumes from $SAVE.
#
#   CKPT=ckpts/llama3-8b-tp8 PRIOR=ckpts/llama3-8b-tp8-sparsegpt DATA=data/c4_llama3_text_document \
#   SAVE=ckpts/llama3-8b-tp8-maskllm bash scripts/train_mask_llama3_8b_tp8.sh [extra flags]
set -euo pipefail
MODEL_TAG=llama3-8b exec bash "$(dirname "$0")/_train_mask_tp8.sh" "$@"
