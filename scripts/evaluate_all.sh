#!/usr/bin/env bash
# Every evaluation the README table needs, in priority order; each command resumes where it stopped
# (finished seeds are kept in results/.partial), so this can be killed and rerun at any time.
#   1. tuned baselines of every MNIST task (coarse grid, then the best lr at 10 x 10k; MLPs also the fine step)
#   2. the CL+IL optimizers on every task (claims c and e)
#   3. every other bundled name on MLP-orig (claims a, b, d, f), then on the other tasks
#   4. bundled files and cards refreshed with their evaluations, README table regenerated
# usage: scripts/evaluate_all.sh      (env: PYTHON, WORKERS=1)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-python}
TASKS="mlp-orig mlp-relu mlp-deeper mlp-fashion conv-mnist lenet nas-cell"
scripts/baselines.sh $TASKS
scripts/baselines_fine.sh mlp-orig mlp-relu mlp-deeper mlp-fashion
for task in $TASKS; do scripts/evaluate_learned.sh "$task" 10 dm-cl-il rnnprop-cl-il scale-cl-il; done
scripts/evaluate_learned.sh mlp-orig 10 dm dm-il dm-cl rnnprop scale dm-aug
for task in $TASKS; do scripts/evaluate_learned.sh "$task" 10 dm dm-il dm-cl rnnprop scale dm-aug; done
# 4. every bundled file and card gets the evaluations of its own weights; the README table is regenerated
$PYTHON -m meta_train.export --pretrained-dir pretrained --refresh $($PYTHON -c "from learned_optim.weights import registry; print(' '.join(registry()))")
$PYTHON -m meta_train.report results --readme README.md
