#!/usr/bin/env bash
# The main job: set up, prepare the data root, train and evaluate the default digits model,
# export it (SavedModel + ONNX, verified) into the model repository, start the service and call
# it over HTTP and gRPC with real test digits (raw requests, then the SDK), and score a folder.
# Usage: scripts/main.sh [RUN_DIR]   (default runs/main-mnist_convnet; repository
# $CNNKIT_MODEL_REPOSITORY, else model_repository/; ports $CNNKIT_HTTP_PORT/$CNNKIT_GRPC_PORT,
# else 3000 and 8500)
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

mkdir -p runs
http_port="${CNNKIT_HTTP_PORT:-3000}"
grpc_port="${CNNKIT_GRPC_PORT:-8500}"
.venv/bin/cnnkit serve --http-port "$http_port" --grpc-port "$grpc_port" > runs/main-service.log 2>&1 &
service_pid=$!
trap 'kill "$service_pid" 2>/dev/null; wait "$service_pid" 2>/dev/null' EXIT
echo "Starting the service (log: runs/main-service.log) ..."
for _ in $(seq 1 240); do
    if curl -fs "http://127.0.0.1:$http_port/readyz" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$service_pid" 2>/dev/null; then echo "The service exited:"; tail -20 runs/main-service.log; exit 1; fi
    sleep 1
done
rm -rf runs/main-digits
.venv/bin/python scripts/smoke_service.py --model digits --http "http://127.0.0.1:$http_port" \
    --grpc "127.0.0.1:$grpc_port" --save-images runs/main-digits
# Batch scoring with the SDK: the same test digits as image files, over gRPC, into a CSV.
rm -f runs/main-scores.csv
.venv/bin/cnnkit score runs/main-digits --model digits --grpc "127.0.0.1:$grpc_port" --out runs/main-scores.csv \
    --no-progress
