#!/usr/bin/env bash
# Packs .devpkg/, what a GPU-machine call carries besides the working tree (see scripts/device_env.sh):
# - the bundle of ../shared/tools/device-bundle.sh (Ray, RLlib, gymnasium, ale-py, MLflow), less what
#   the run never loads (Ray's dashboard UI, Serve and LLM packages: gpu_run.sh starts Ray with
#   --include-dashboard false), its shared libraries' debug sections stripped (`strip --strip-debug`:
#   code and symbols stay), repacked with `xz -9e`: 37.6 MB against the 49 MB of the bundle as made;
# - the LPIPS weights (bash scripts/setup.sh makes them), xz-compressed (0.9 MB smaller).
# The device tool caps a call's tree, carried paths included, at 64 MiB: the bundle (37.6 MB) and
# the weights (9.1 MB) leave about 16 MiB for the tracked files. The script ends with the sum, and
# fails when the sum is over the cap.
#   bash scripts/device_pack.sh            (about 5 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
weights=$("$PY" -c "from models.lpips import weights_path; print(weights_path())")
[ -f "$weights" ] || { echo "device_pack.sh: no LPIPS weights at $weights: run bash scripts/setup.sh first" >&2; exit 1; }
bash ../shared/tools/device-bundle.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -xJf .devpkg/devsite.tar.xz -C "$tmp"
rm -rf "$tmp/ray/dashboard/client" "$tmp/ray/serve" "$tmp/ray/llm"
find "$tmp" -name '*.so*' -type f -exec strip --strip-debug {} +
tar -C "$tmp" -cf - . | xz -9e -T0 > .devpkg/devsite.tar.xz.part
mv .devpkg/devsite.tar.xz.part .devpkg/devsite.tar.xz
rm -f .devpkg/lpips_alex_v0.1.pt
xz -9e -T0 -c "$weights" > .devpkg/lpips_alex_v0.1.pt.xz
# What a call carrying .devpkg sends: tracked files, untracked files git does not ignore, .devpkg.
git ls-files -z --cached --others --exclude-standard | "$PY" -c '
import os, sys
files = [f for f in sys.stdin.read().split("\0") if f and os.path.isfile(f)]
files += [os.path.join(d, f) for d, _, fs in os.walk(".devpkg") for f in fs]
sent, cap = sum(os.path.getsize(f) for f in files), 64 * 2**20
print(f"a call carrying .devpkg sends {sent / 2**20:.1f} MiB of the 64 MiB cap")
sys.exit(0 if sent <= cap else "device_pack.sh: over the cap: carry .devpkg/devsite.tar.xz alone (no LPIPS) or trim the tree")
'
