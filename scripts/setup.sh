#!/usr/bin/env bash
# Creates .venv with a CPU torch and the pinned stack, and prepares the LPIPS AlexNet weights.
# GPU machines: install a CUDA torch first (pip install torch), then run this with TORCH_SPEC=skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build on CPU machines.
[ "$TORCH_SPEC" = skip ] || python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -e ".[test]"
if [ -f scripts/setup_lpips.py ]; then python scripts/setup_lpips.py; fi
