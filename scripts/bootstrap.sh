#!/usr/bin/env bash
# Set up prunetrack on a fresh machine: a virtual environment in .venv with pinned,
# known-good versions (constraints.txt), and CIFAR-10 in data/ when an offline copy
# sits beside the checkout (../shared/data). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet -c constraints.txt -e ".[test,ray]"

OFFLINE_COPY=../shared/data/cifar10_jpeg.py
if [ ! -f data/cifar-10-batches-py/test_batch ] && [ -f "$OFFLINE_COPY" ]; then
  echo "materializing CIFAR-10 from $OFFLINE_COPY into data/"
  .venv/bin/python "$OFFLINE_COPY" materialize data
fi
echo "ready: . .venv/bin/activate"
