#!/usr/bin/env bash
# MaskLLM on LLaMA-2 7B with the paper's settings (see _train_mask_tp8.sh). Re-running the same
# command resumes from $SAVE.
#
#   CKPT=ckpts/llama2-7b-tp8 PRIOR=ckpts/llama2-7b-tp8-sparsegpt DATA=data/c4_llama2_text_document \
#   SAVE=ckpts/llama2-7b-tp8-maskllm bash scripts/train_mask_llama2_7b_tp8.sh [extra flags]
set -euo pipefail
MODEL_TAG=llama2-7b exec bash "$(dirname "$0")/_train_mask_tp8.sh" "$@"
