#!/usr/bin/env bash
# Train the named recipes one after another into runs/RECIPE, resuming any run that was cut off.
# This is how the README's results table is produced:
#   CNNKIT_DATA_DIR=.data scripts/train_recipes.sh mnist_convnet mnist_lenet5 fashion_cnn
set -euo pipefail
cd "$(dirname "$0")/.."
runs_root="${CNNKIT_RUNS:-runs}"
for recipe in "$@"; do
    run_dir="$runs_root/$recipe"
    if [ -f "$run_dir/model.keras" ] && [ -f "$run_dir/evaluation/metrics.json" ]; then
        echo "[train_recipes] $recipe is already trained in $run_dir"
        continue
    fi
    if [ -f "$run_dir/config.yaml" ]; then
        cnnkit train "$recipe" --output "$run_dir" --resume
    else
        cnnkit train "$recipe" --output "$run_dir"
    fi
done
