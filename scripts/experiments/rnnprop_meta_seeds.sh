#!/usr/bin/env bash
# How much does the 10,000-step result of the vanilla RNNprop recipe (100 epochs at N=100, validation every
# 10 epochs at N=100) depend on the meta-training seed? Trains the recipe with --seed S for each S given, then
# evaluates each run's selected weights on MLP-orig (10,000 steps, evaluation seed 0, the bundled rnnprop's
# seed-0 initialisation and batches). Resumable: a finished training or evaluation is skipped.
# Usage: bash scripts/experiments/rnnprop_meta_seeds.sh 1 2 3 ...   (then python scripts/experiments/rnnprop_meta_seeds.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
for s in "$@"; do
  out=runs/rnnprop-seeds/s$s
  python -m meta_train --model rnnprop --seed "$s" --eval-runs 10 --threads 1 --no-progress --out "$out" --resume
  python -m meta_train.evaluate --optimizer "$out/weights.safetensors" --label "rnnprop-s$s" --task mlp-orig \
    --steps 10000 --seeds 1 --out results/diagnostics/rnnprop_meta_seeds --workers 1 --threads 1 --no-progress
done
