#!/usr/bin/env bash
# The GPU-machine run behind docs/results.md: the `gpu` preset of the pipeline on Breakout
# (collect with PPO on 16 cores, VAE + DiT on the H100, evaluation at 210x160), then the
# generation and multi-frame-vs-single-step benchmarks on the trained world model.
#   . scripts/device_env.sh && bash scripts/gpu_run.sh /tmp/gpurun
# Everything lands under $1; `pack` makes $1/results.tar.gz of the small files.
set -uo pipefail
out=${1:-/tmp/gpurun}
mkdir -p "$out"
if [ "${2:-}" = pack ]; then
  cd "$out" && tar -czf results.tar.gz --exclude='*.pt' --exclude='*.parquet' --exclude='mlartifacts' \
    --exclude='data' --exclude='dit-*' --exclude='vae/checkpoint*' stages eval models/*/world_model.json \
    models/*/vae.json *.metrics.jsonl bench_*.csv bench_*.log job.log 2>/dev/null
  ls -la results.tar.gz; exit 0
fi
start=$(date +%s)
python pipeline/run_all.py --preset gpu --out "$out" --stages collect vae dit evaluate 2>&1 | \
  grep --line-buffered -v -E "Warning|warn\(|DeprecationWarning|Stella|A\.L\.E" > "$out/job.log"
echo "pipeline exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s" >> "$out/job.log"
wm="$out/models/dit-Breakout"
python -m benchmarks.bench_generate --world-model "$wm" --batch-sizes 1 64 256 --sample-steps 8 \
  --compile eager --out "$out/bench_generate.csv" > "$out/bench_generate.log" 2>&1
python -m benchmarks.bench_multistep --multi-frame "$wm" --data-root "$out/data" --game Breakout \
  --horizons 4 8 16 --max-windows 128 --batch-size 32 --out "$out/bench_multistep.csv" > "$out/bench_multistep.log" 2>&1
# (run separately when budget allows) python -m benchmarks.bench_train --presets S --batch-sizes 32 --compile eager compile --warmup 3 --steps 15 \
#   --spatial-downsample 4 --latent-channels 8 --patch-size 1 4 4 --out "$out/bench_train.csv" > "$out/bench_train.log" 2>&1
# Collection on the 16 cores: PPO inference on the CPU, then on GPU shares (14 runners x 1/14).
for gpus in 0 0.07; do
  python benchmarks/bench_collect.py --games Breakout Pong --steps 56000 --steps-per-round 1000 \
    --num-env-runners 14 --gpus-per-env-runner $gpus --profile-env > "$out/bench_collect_gpu$gpus.log" 2>&1
done
echo "all done after $(( $(date +%s) - start )) s" >> "$out/job.log"
