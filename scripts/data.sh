#!/usr/bin/env bash
# Print the data root to use, preparing it from ../shared/datasets when it is not there yet.
# CNNKIT_DATA_DIR wins when set; otherwise .data/ in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
data_dir="${CNNKIT_DATA_DIR:-$PWD/.data}"
shared="${CNNKIT_SHARED_DATASETS:-$PWD/../shared/datasets}"
if [ ! -f "$data_dir/MANIFEST.json" ]; then
    if [ ! -f "$shared/prepare.py" ]; then
        echo "No data root at $data_dir and no $shared/prepare.py to make one:" >&2
        echo "set CNNKIT_DATA_DIR to a prepared data root (see README.md, Data)." >&2
        exit 1
    fi
    .venv/bin/python "$shared/prepare.py" "$data_dir" >&2
fi
echo "$data_dir"
