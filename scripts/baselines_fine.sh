#!/usr/bin/env bash
# Fine step of the baseline tuning, at the full budget: the coarse grid's best lr and its two half-decade
# neighbours, each at SEEDS x STEPS, as an lr grid in results/ (the README table shows its best point).
# While the best point sits at an end of that grid, the grid grows by a half-decade on that side (at most
# MAX_EXTEND times), so the reported lr is bracketed at the full budget. Finished points are reused
# (results/OPT__TASK.json from scripts/baselines.sh, and earlier points of the same grid): only new lrs run.
# The coarse grid runs 2,000 steps, which favours large lrs; this checks the choice at 10,000 steps.
# usage: scripts/baselines_fine.sh TASK [TASK ...]
#        (env: SEEDS=10 STEPS=10000 WORKERS=1 OPTS="adam rmsprop sgd" MAX_EXTEND=3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
for task in "$@"; do
  for opt in ${OPTS:-adam rmsprop sgd}; do
    lrs=$($PY -c "import json,sys; b=json.load(open(sys.argv[1]))['best']['lr']; r=10**0.5
print(','.join(f'{x:.6g}' for x in (b/r, b, b*r)))" "results/grid/${opt}__${task}__grid.json")
    for _ in $(seq 0 "${MAX_EXTEND:-3}"); do
      $PY -m meta_train.evaluate --optimizer $opt --lr-grid "$lrs" --task "$task" --steps "${STEPS:-10000}" \
          --seeds "${SEEDS:-10}" --out results --workers "${WORKERS:-1}" --no-progress
      next=$($PY -c "import json,sys; g=json.load(open(sys.argv[1])); b=g['best']['lr']; r=10**0.5
lrs=sorted(p['lr'] for p in g['points'])
lrs=[lrs[0]/r]+lrs if b==lrs[0] else lrs+[lrs[-1]*r] if b==lrs[-1] else lrs
print(','.join(f'{x:.6g}' for x in lrs))" "results/${opt}__${task}__grid.json")
      [ "$next" = "$lrs" ] && break
      lrs=$next
    done
  done
done
