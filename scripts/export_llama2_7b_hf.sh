#!/usr/bin/env bash
# Export learned 2:4 masks of LLaMA-2 7B to Hugging Face (masked safetensors + packed masks), then
# check the masks reproduce on the dense HF model with WikiText-2 perplexity.
#   LOAD=ckpts/llama2-7b-tp8-maskllm OUT=hf/llama2-7b-maskllm DENSE=/models/Llama-2-7b-hf \
#       bash scripts/export_llama2_7b_hf.sh
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
require LOAD "the mask-trained checkpoint"
OUT=${OUT:-hf/llama2-7b-maskllm}
CHECK=()
if [ -n "${DENSE:-}" ]; then
    CHECK=(python "$LAUNCH_TOOLS/eval_hf_ppl.py" --model "$DENSE" --mask "$OUT/masks.npz"
           --data wikitext2 --seq-length 4096)
fi
if dry_run; then
    [ ${#CHECK[@]} -gt 0 ] && echo "then: ${CHECK[*]}"
    launch llama2-7b python "$LAUNCH_TOOLS/export_hf.py" --load "$LOAD" --out "$OUT" \
        --mask-file "$OUT/masks.npz" "$@"
fi
python "$LAUNCH_TOOLS/export_hf.py" --load "$LOAD" --out "$OUT" --mask-file "$OUT/masks.npz" "$@"
if [ ${#CHECK[@]} -gt 0 ]; then
    "${CHECK[@]}"
fi
