#!/usr/bin/env bash
# Tuned baselines, coarse-to-fine (what results/ holds):
#   1. every lr of the half-decade grid 1e-4..1 at SEEDS_GRID seeds x STEPS_GRID steps  -> results/grid/
#   2. the best lr of each optimizer at SEEDS x STEPS                                    -> results/
# usage: scripts/baselines.sh TASK [TASK ...]   (env: SEEDS_GRID=2 STEPS_GRID=2000 SEEDS=10 STEPS=10000 WORKERS=1)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
for task in "$@"; do
  for opt in adam rmsprop sgd; do
    $PY -m meta_train.evaluate --optimizer $opt --lr-grid default --task "$task" --steps "${STEPS_GRID:-2000}" \
        --seeds "${SEEDS_GRID:-2}" --out results/grid --workers "${WORKERS:-1}" --no-progress
    best=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['best']['lr'])" "results/grid/${opt}__${task}__grid.json")
    $PY -m meta_train.evaluate --optimizer $opt --lr "$best" --task "$task" --steps "${STEPS:-10000}" \
        --seeds "${SEEDS:-10}" --out results --workers "${WORKERS:-1}" --no-progress
  done
done
