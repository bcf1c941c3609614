#!/usr/bin/env bash
# Set up (scripts/setup.sh), prepare the data root, then run the default test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
CNNKIT_DATA_DIR="$(scripts/data.sh)"
export CNNKIT_DATA_DIR
.venv/bin/python -m ruff check .
.venv/bin/python -m mypy
.venv/bin/python -m pytest "$@"
