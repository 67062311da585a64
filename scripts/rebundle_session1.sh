#!/usr/bin/env bash
# How the bundled weights of session 1 were produced: each run's best validated model, with the run's
# recipe, wall-clock and its evaluation summaries (results/NAME__TASK.json) embedded in the metadata and card.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
b() { name=$1; shift; $PY -m meta_train.export "runs/$name" "$name" --pretrained-dir pretrained \
        --evaluation results/${name}__*.json --notes "$*"; }
b dm "Vanilla L2O-DM shortened to 300 epochs at N=100 (paper: 10,000). Validation at 100 steps stayed at ln 10 (the init plateau); over 10,000 steps it trains slowly and does not degrade."
b dm-il "L2O-DM + imitation of Adam (r=0.3), 300 epochs at N=100 (paper: 10,000)."
b dm-cl "L2O-DM + curriculum without imitation, horizons 100,200,500, stopped at epoch 121: it never left the init plateau (validation = ln 10). Does not train."
b dm-cl-il "L2O-DM + curriculum + imitation (r=0.1,0.1,0.3), horizons 100,200,500,1000; stopped at epoch 204 on entering N=1000, so these are the best N=500-stage weights. Resume from runs/dm-cl-il/checkpoint.pt."
b rnnprop "RNNprop, the paper's recipe: 100 epochs at N=100 (validation with 10 runs instead of 20)."
b rnnprop-cl-il "RNNprop + curriculum + imitation (r=0.3), horizons 100,200,500,1000; stopped at epoch 140 in the N=500 stage. Resume from runs/rnnprop-cl-il/checkpoint.pt."
