#!/usr/bin/env bash
# AST on LLaMA-2 7B (the paper's LLaMA-2 7B settings, _train_ast_tp8.sh). Re-running
# the same command resumes from $SAVE.
#
#   CKPT=ckpts/llama2-7b-tp8-sparsegpt DATA=data/c4_llama2_text_document \
#   SAVE=ckpts/llama2-7b-tp8-ast bash scripts/train_ast_llama2_7b_tp8.sh [extra flags]
set -euo pipefail
MODEL_TAG=llama2-7b exec bash "$(dirname "$0")/_train_ast_tp8.sh" "$@"
