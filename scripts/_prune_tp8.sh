#!/usr/bin/env bash
# Shared body of the one-shot pruning launchers: MODEL_TAG set by the caller.
#   bash scripts/run_<model>_prune_tp8.sh {magnitude,wanda,sparsegpt} [--update-weight] [flags]
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
if [[ $# -lt 1 ]]; then
    echo "usage: $0 magnitude|wanda|sparsegpt [--update-weight] [extra flags]" >&2
    exit 2
fi
METHOD=$1
shift
require CKPT "a converted TP=8 checkpoint of ${MODEL_TAG}"
require CALIB_DATA "a tokenised .bin/.idx prefix (paper: C4) or embedded"
SUFFIX=$METHOD
for arg in "$@"; do [[ $arg == --update-weight ]] && SUFFIX=${METHOD}-update; done
SAVE=${SAVE:-ckpts/${MODEL_TAG}-tp8-${SUFFIX}}
launch "$MODEL_TAG" torchrun --nproc-per-node "${NPROC:-8}" --master-port "${MASTER_PORT:-29500}" \
    "$LAUNCH_TOOLS/prune_oneshot.py" \
    --load "$CKPT" --method "$METHOD" --calib-data "$CALIB_DATA" \
    --calib-samples "${CALIB_SAMPLES:-128}" --seq-length "${SEQ_LENGTH:-4096}" \
    --save "$SAVE" "$@"
