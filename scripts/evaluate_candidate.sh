#!/usr/bin/env bash
# Evaluate a candidate weight file under the name it would be bundled as, on the given tasks, with the full
# protocol (10 seeds x 10,000 steps), one task after another; resumable (finished seeds are kept).
#   scripts/evaluate_candidate.sh runs/NAME/weights.safetensors NAME results/candidates TASK [TASK ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
weights=$1 label=$2 out=$3
shift 3
for task in "$@"; do
  $PYTHON -m meta_train.evaluate --optimizer "$weights" --label "$label" --task "$task" --steps 10000 --seeds 10 \
    --out "$out" --workers 1 --threads 1 --no-progress
done
