#!/usr/bin/env bash
# Evaluate bundled weights with the protocol: scripts/evaluate_learned.sh TASK SEEDS NAME [NAME ...]
# (STEPS=10000 by default; results go to results/ next to the tuned baselines)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
task=$1; seeds=$2; shift 2
for name in "$@"; do
  $PY -m meta_train.evaluate --optimizer "$name" --task "$task" --steps "${STEPS:-10000}" --seeds "$seeds" \
      --out results --workers "${WORKERS:-1}" --no-progress
done
