#!/usr/bin/env bash
# Fine step of the baseline tuning, at the full budget: the coarse grid's best lr and its two half-decade
# neighbours, each at SEEDS x STEPS, as an lr grid in results/ (the README table shows its best point).
# The coarse best is reused from results/OPT__TASK.json (scripts/baselines.sh), so only the neighbours run.
# The coarse grid runs 2,000 steps, which favours large lrs; this checks the choice at 10,000 steps.
# usage: scripts/baselines_fine.sh TASK [TASK ...]   (env: SEEDS=10 STEPS=10000 WORKERS=1 OPTS="adam rmsprop sgd")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
for task in "$@"; do
  for opt in ${OPTS:-adam rmsprop sgd}; do
    lrs=$($PY -c "import json,sys; b=json.load(open(sys.argv[1]))['best']['lr']; r=10**0.5
print(','.join(f'{x:.6g}' for x in (b/r, b, b*r)))" "results/grid/${opt}__${task}__grid.json")
    $PY -m meta_train.evaluate --optimizer $opt --lr-grid "$lrs" --task "$task" --steps "${STEPS:-10000}" \
        --seeds "${SEEDS:-10}" --out results --workers "${WORKERS:-1}" --no-progress
  done
done
