#!/usr/bin/env bash
# Hugging Face LLaMA-3 8B -> megatron-sparse checkpoint for TP=8.
#   HF=/models/Meta-Llama-3-8B OUT=ckpts/llama3-8b-tp8 bash scripts/convert_llama3_8b_tp8.sh [--overwrite]
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
HF=${HF:-meta-llama/Meta-Llama-3-8B}
OUT=${OUT:-ckpts/llama3-8b-tp8}
launch llama3-8b python "$LAUNCH_TOOLS/convert_hf_to_megatron.py" \
    --hf "$HF" --tp 8 --out "$OUT" "$@"
