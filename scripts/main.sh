#!/usr/bin/env bash
# The main job: set up, prepare the data root, train and evaluate the default digits model, then
# export it (SavedModel + ONNX, verified) into the model repository.
# Usage: scripts/main.sh [RUN_DIR]   (default runs/main-mnist_convnet; repository
# $CNNKIT_MODEL_REPOSITORY, else model_repository/)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
CNNKIT_DATA_DIR="$(scripts/data.sh)"
export CNNKIT_DATA_DIR
run_dir="${1:-runs/main-mnist_convnet}"
if [ -f "$run_dir/config.yaml" ]; then
    .venv/bin/cnnkit train --resume --output "$run_dir"
else
    .venv/bin/cnnkit train mnist_convnet --output "$run_dir"
fi
# Training ends with the evaluation (metrics.json, report.md and its pictures).
echo "Report: $run_dir/evaluation/report.md"
version_dir="$(.venv/bin/cnnkit export "$run_dir" --name digits)"
echo "Exported: $version_dir"
