#!/usr/bin/env bash
# Hugging Face LLaMA-2 7B -> megatron-sparse checkpoint for TP=8.
#   HF=/models/Llama-2-7b-hf OUT=ckpts/llama2-7b-tp8 bash scripts/convert_llama2_7b_tp8.sh [--overwrite]
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
HF=${HF:-meta-llama/Llama-2-7b-hf}
OUT=${OUT:-ckpts/llama2-7b-tp8}
launch llama2-7b python "$LAUNCH_TOOLS/convert_hf_to_megatron.py" \
    --hf "$HF" --tp 8 --out "$OUT" "$@"
