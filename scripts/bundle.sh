#!/usr/bin/env bash
# Bundle finished (or stopped) meta-training runs from runs/NAME into pretrained/NAME.{safetensors,md}
# with their sha256 pinned in pretrained/registry.json: scripts/bundle.sh NAME [NAME ...]
# An existing bundled name is refused; FORCE=1 replaces it.
# The weights are the run's best validated model so far; the recipe in the metadata says how far it got.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
for name in "$@"; do
  $PY -m meta_train.export "runs/$name" "$name" --pretrained-dir pretrained ${FORCE:+--force} \
      --notes "shortened recipe, see runs/$name/log.jsonl and the model card; command in runs/COMMANDS.md"
done
