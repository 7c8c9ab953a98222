#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md on the first visible GPU (under 8 minutes); exits 0 with a message
# where TensorFlow sees no GPU. Run from anywhere: bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
TF_CPP_MIN_LOG_LEVEL=2 exec "$PYTHON" bench/gpu_check.py
