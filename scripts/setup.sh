#!/usr/bin/env bash
# Create .venv (Python 3.11) and install cnnkit with every extra, once; later runs are quick no-ops.
# Prints nothing but pip's progress. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON:-python3.11}"
if ! command -v "$python_bin" >/dev/null; then
    python_bin=python3
fi
if [ ! -x .venv/bin/python ]; then
    "$python_bin" -m venv .venv
fi
stamp=.venv/.cnnkit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[export,serving,loadtest,ray,dev]"
    # Triton's client, for the Open Inference Protocol conformance tests: its pins (protobuf<7,
    # ml-dtypes<=0.5.4) clash with TensorFlow's, so it comes without its dependencies; what it
    # imports is already here but python-rapidjson.
    .venv/bin/python -m pip install --quiet --no-deps tritonclient==2.73.0 python-rapidjson==1.25
    touch "$stamp"
fi
