#!/usr/bin/env bash
# Tuned baselines, coarse-to-fine (what results/ holds):
#   1. every lr of the half-decade grid 1e-4..1 at SEEDS_GRID seeds x STEPS_GRID steps  -> results/grid/
#      While the best lr sits at an end of the grid, or no lr moves the loss off its initial plateau (SGD on the
#      sigmoid LeNet), the grid grows by a half-decade on that side (upwards when nothing trains), at most
#      MAX_EXTEND times; points already computed are reused.
#   2. the best lr of each optimizer at SEEDS x STEPS                                    -> results/
#   (3. scripts/baselines_fine.sh: the best lr and its neighbours at SEEDS x STEPS, for the cheap tasks)
# usage: scripts/baselines.sh TASK [TASK ...]
#        (env: SEEDS_GRID=2 STEPS_GRID=2000 SEEDS=10 STEPS=10000 WORKERS=1 OPTS="adam rmsprop sgd" MAX_EXTEND=3
#         GRID_ONLY=1: step 1 only, e.g. every optimizer's grid before any final on a slow task)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
for task in "$@"; do
  for opt in ${OPTS:-adam rmsprop sgd}; do
    lrs=default
    for _ in $(seq 0 "${MAX_EXTEND:-3}"); do
      $PY -m meta_train.evaluate --optimizer $opt --lr-grid "$lrs" --task "$task" --steps "${STEPS_GRID:-2000}" \
          --seeds "${SEEDS_GRID:-2}" --out results/grid --workers "${WORKERS:-1}" --no-progress
      next=$($PY - "results/grid/${opt}__${task}__grid.json" <<'PYEOF'
import json, math, sys
from pathlib import Path
grid = json.load(open(sys.argv[1]))
points = sorted(grid["points"], key=lambda p: p["lr"])
lrs, best, r = [p["lr"] for p in points], grid["best"]["lr"], 10 ** 0.5
def start(p):  # mean initial ln loss of that point's seeds
    curves = json.loads((Path(sys.argv[1]).parent / p["file"]).read_text())["losses"]
    return sum(math.log(c[0]) for c in curves) / len(curves)
stuck = all(p["final_ln_loss_mean"] is None or p["final_ln_loss_mean"] > start(p) - 0.1 for p in points)
if stuck or best == lrs[-1]:
    lrs = lrs + [lrs[-1] * r]
elif best == lrs[0]:
    lrs = [lrs[0] / r] + lrs
print(",".join(f"{x:.6g}" for x in lrs))
PYEOF
)
      current=$($PY -c "import json,sys; print(','.join(f'{p[\"lr\"]:.6g}' for p in sorted(json.load(open(sys.argv[1]))['points'], key=lambda p: p['lr'])))" "results/grid/${opt}__${task}__grid.json")
      [ "$next" = "$current" ] && break
      lrs=$next
    done
    [ -n "${GRID_ONLY:-}" ] && continue
    best=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['best']['lr'])" "results/grid/${opt}__${task}__grid.json")
    $PY -m meta_train.evaluate --optimizer $opt --lr "$best" --task "$task" --steps "${STEPS:-10000}" \
        --seeds "${SEEDS:-10}" --out results --workers "${WORKERS:-1}" --no-progress
  done
done
