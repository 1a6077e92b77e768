#!/usr/bin/env bash
# Export learned 2:4 masks of LLaMA-2 7B to Hugging Face (masked safetensors + packed masks), then
# check the masks reproduce on the dense HF model with WikiText-2 perplexity.
#   LOAD=ckpts/llama2-7b-tp8-maskllm OUT=hf/llama2-7b-maskllm DENSE=/models/Llama-2-7b-hf \
#       bash scripts/export_llama2_7b_hf.sh
set -euo pipefail
: "${LOAD:?set LOAD to the mask-trained checkpoint}"
OUT=${OUT:-hf/llama2-7b-maskllm}
DIR=$(dirname "$0")/../tools
python "$DIR/export_hf.py" --load "$LOAD" --out "$OUT" --mask-file "$OUT/masks.npz" "$@"
if [ -n "${DENSE:-}" ]; then
    python "$DIR/eval_hf_ppl.py" --model "$DENSE" --mask "$OUT/masks.npz" --data wikitext2 \
        --seq-length 4096
fi
