#!/usr/bin/env bash
# Tokenise local C4 shards (allenai/c4 en, c4-train.XXXXX-of-01024.json.gz) into one .bin/.idx
# prefix per shard, as MaskLLM's training data.
#   C4_DIR=/data/c4/en TOKENIZER=/models/Llama-2-7b-hf OUT=data/c4_llama2 SHARDS="00000 00001" \
#       bash scripts/preprocess_c4.sh
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
require C4_DIR "the directory holding c4-train.*.json.gz"
require TOKENIZER "a HF tokenizer directory or sentencepiece .model"
OUT=${OUT:-data/c4}
SHARDS=${SHARDS:-00000}
dry_run || mkdir -p "$(dirname "$OUT")"
for shard in $SHARDS; do
    CMD=(python "$LAUNCH_TOOLS/preprocess_data.py" --json-key text
         --input "$C4_DIR/c4-train.${shard}-of-01024.json.gz" --tokenizer "$TOKENIZER"
         --out "${OUT}_${shard}_text_document")
    if dry_run; then
        echo "command: ${CMD[*]}"
        [ -e "${CMD[5]}" ] || echo "path --input ${CMD[5]}: missing (not checked in a dry run)"
    else
        "${CMD[@]}"
    fi
done
dry_run && echo "plan: tokenise $(wc -w <<< "$SHARDS") C4 shard(s) on the host (no GPU, no model)"
exit 0
