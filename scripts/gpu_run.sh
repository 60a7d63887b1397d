#!/usr/bin/env bash
# The GPU-machine run behind docs/results.md: the `gpu` preset of the pipeline on one game
# (collect with PPO on 16 cores, VAE + DiT on the GPU, evaluation at 210x160), then the generation,
# training-throughput, collection and multi-frame-vs-single-step benchmarks.
#   . scripts/device_env.sh && bash scripts/gpu_run.sh /tmp/gpurun [Breakout]
# Everything lands under $1; `bash scripts/gpu_run.sh $1 pack` makes $1/results.tar.gz of the
# small files (logs, metrics, tables, figures) while or after it runs; `... $1 wait 540` waits up
# to 540 s for the run to end first.
set -uo pipefail
out=${1:-/tmp/gpurun}
mkdir -p "$out"
if [ "${2:-}" = pack ]; then
  cd "$out" && tar -czf results.tar.gz --exclude='*.pt' --exclude='*.parquet' --exclude='*.npz' \
    stages eval figures models/*/world_model.json models/*/vae.json *.metrics.jsonl *.csv *.log progress 2>/dev/null
  ls -la results.tar.gz; exit 0
fi
if [ "${2:-}" = wait ]; then  # wait up to $3 s for the run to finish, then pack what is there
  end=$(( $(date +%s) + ${3:-540} ))
  while [ "$(date +%s)" -lt "$end" ] && ! grep -q "all done" "$out/progress" 2>/dev/null; do sleep 5; done
  cat "$out/progress"; tail -n 4 "$out/job.log"
  exec bash "$0" "$out" pack
fi
game=${2:-Breakout}
start=$(date +%s)
mark() { echo "$(( $(date +%s) - start )) s: $*" >> "$out/progress"; }
# GPU utilisation every 0.5 s for the whole run (the DiT's share is cut out by its metric times).
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 500 > "$out/gpu_util.csv" 2>/dev/null &
smi=$!
mark "pipeline start ($game)"
python pipeline/run_all.py --preset gpu --games "$game" --out "$out" --stages collect vae dit evaluate 2>&1 | \
  grep --line-buffered -v -E "Warning|warn\(|DeprecationWarning|Stella|A\.L\.E" > "$out/job.log"
mark "pipeline exit ${PIPESTATUS[0]}"
kill $smi 2>/dev/null
wm="$out/models/dit-$game"
python -m benchmarks.bench_generate --world-model "$wm" --batch-sizes 1 64 256 --sample-steps 8 \
  --compile eager --out "$out/bench_generate.csv" > "$out/bench_generate.log" 2>&1
mark "bench_generate exit $?"
python -m benchmarks.bench_train --presets S --batch-sizes 32 --compile eager compile --warmup 3 --steps 15 \
  --spatial-downsample 4 --latent-channels 8 --patch-size 1 4 4 --profile \
  --out "$out/bench_train.csv" > "$out/bench_train.log" 2>&1
mark "bench_train exit $?"
python -m benchmarks.bench_multistep --multi-frame "$wm" --data-root "$out/data" --game "$game" \
  --horizons 4 8 16 --max-windows 128 --batch-size 32 --out "$out/bench_multistep.csv" > "$out/bench_multistep.log" 2>&1
mark "bench_multistep exit $?"
# Collection on the 16 cores: PPO inference on the CPU, then on GPU shares (14 runners x 1/14).
for gpus in 0.07 0; do
  python benchmarks/bench_collect.py --games Breakout Pong --steps 28000 --steps-per-round 1000 \
    --num-env-runners 14 --gpus-per-env-runner $gpus > "$out/bench_collect_gpu$gpus.log" 2>&1
  mark "bench_collect gpus=$gpus exit $?"
done
mark "all done"
