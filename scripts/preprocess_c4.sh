#!/usr/bin/env bash
# Tokenise local C4 shards (allenai/c4 en, c4-train.XXXXX-of-01024.json.gz) into one .bin/.idx
# prefix per shard, as MaskLLM's training data.
#   C4_DIR=/data/c4/en TOKENIZER=/models/Llama-2-7b-hf OUT=data/c4_llama2 SHARDS="00000 00001" \
#       bash scripts/preprocess_c4.sh
set -euo pipefail
: "${C4_DIR:?set C4_DIR to the directory holding c4-train.*.json.gz}"
: "${TOKENIZER:?set TOKENIZER to a HF tokenizer directory or sentencepiece .model}"
OUT=${OUT:-data/c4}
SHARDS=${SHARDS:-00000}
mkdir -p "$(dirname "$OUT")"
for shard in $SHARDS; do
    python "$(dirname "$0")/../tools/preprocess_data.py" --json-key text \
        --input "$C4_DIR/c4-train.${shard}-of-01024.json.gz" --tokenizer "$TOKENIZER" \
        --out "${OUT}_${shard}_text_document"
done
