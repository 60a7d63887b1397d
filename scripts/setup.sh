#!/usr/bin/env bash
# Creates .venv with a CPU torch and the pinned stack, prepares the LPIPS AlexNet weights, and
# installs a headless Chromium for the play page's browser test (tests/test_serve.py).
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
# tests/test_serve.py drives the play page (pipeline/serve.py) in a real headless Chromium.
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
        || command -v google-chrome >/dev/null 2>&1 || [ -n "${AWM_CHROMIUM:-}" ]; then
    :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium > /dev/null \
        || { apt-get update -q > /dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium > /dev/null; } \
        || echo "setup: apt-get install -y chromium failed; tests/test_serve.py skips its browser test without it" >&2
else
    echo "setup: tests/test_serve.py drives a headless Chromium; install it as root with" \
         "'apt-get install -y chromium' (Debian; Ubuntu: a chromium or google-chrome package), or set" \
         "AWM_CHROMIUM to a Chromium/Chrome binary" >&2
fi
