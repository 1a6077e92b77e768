#!/usr/bin/env bash
# Hugging Face LLaMA-3.1 8B (rope_scaling llama3) -> megatron-sparse checkpoint for TP=8.
#   HF=/models/Llama-3.1-8B OUT=ckpts/llama3.1-8b-tp8 bash scripts/convert_llama3.1_8b_tp8.sh [--overwrite]
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
HF=${HF:-meta-llama/Llama-3.1-8B}
OUT=${OUT:-ckpts/llama3.1-8b-tp8}
launch llama3.1-8b python "$LAUNCH_TOOLS/convert_hf_to_megatron.py" \
    --hf "$HF" --tp 8 --out "$OUT" "$@"
