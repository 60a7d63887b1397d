# Source on the GPU machine (Python 3.12 with a CUDA torch, no network) from the repository root:
#   . scripts/device_env.sh
# Unpacks the bundle of ../shared/tools/device-bundle.sh (Ray, RLlib, gymnasium, ale-py, MLflow),
# carried as .devpkg/, and points LPIPS at the weights carried beside it (xz-compressed). `bash
# scripts/device_pack.sh` makes both here and checks that the call fits the device tool's 64 MiB.
mkdir -p /tmp/site
[ -f /tmp/site/.unpacked ] || { tar -xJf .devpkg/devsite.tar.xz -C /tmp/site && touch /tmp/site/.unpacked; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
[ -f /tmp/site/lpips_alex_v0.1.pt ] || xz -dc .devpkg/lpips_alex_v0.1.pt.xz > /tmp/site/lpips_alex_v0.1.pt
export AWM_LPIPS_WEIGHTS=/tmp/site/lpips_alex_v0.1.pt
export RAY_DEDUP_LOGS=1 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
