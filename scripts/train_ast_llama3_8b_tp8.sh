#!/usr/bin/env bash
# AST on LLaMA-3 8B (the paper's LLaMA-2 7B settings, _train_ast_tp8.sh). Re-running
# the same command resumes from $SAVE.
#
#   CKPT=ckpts/llama3-8b-tp8-sparsegpt DATA=data/c4_llama3_text_document \
#   SAVE=ckpts/llama3-8b-tp8-ast bash scripts/train_ast_llama3_8b_tp8.sh [extra flags]
set -euo pipefail
MODEL_TAG=llama3-8b exec bash "$(dirname "$0")/_train_ast_tp8.sh" "$@"
