#!/usr/bin/env bash
# The GPU-machine run behind docs/results.md: the `gpu` preset of the pipeline on one or more
# games (collect with PPO on the CPU cores, VAE + DiT on a GPU, evaluation at 210x160), then the
# generation, training-throughput, multi-frame-vs-single-step and collection benchmarks.
#   . scripts/device_env.sh && bash scripts/gpu_run.sh /tmp/gpurun [Breakout | "Pong DemonAttack"]
# Each game's pipeline writes under $1/<game>/. Several games run at once on one Ray head that
# holds every GPU of the machine (each training job and evaluation takes one GPU), so a 2-GPU
# machine does two games in the time of one. The benchmarks use the first game's model.
# `bash scripts/gpu_run.sh $1 pack` makes $1/results.tar.gz of the small files (logs, metrics,
# tables, figures) while or after it runs; `... $1 wait 540` waits up to 540 s for the run to end
# first. PRESET (default gpu) and BENCH=0 (skip the benchmarks) are for trying it on a CPU machine.
set -uo pipefail
out=${1:-/tmp/gpurun}
mkdir -p "$out"
if [ "${2:-}" = pack ]; then
  cd "$out" && tar -czf results.tar.gz --exclude='*.pt' --exclude='*.parquet' --exclude='*.npz' \
    */stages */eval */figures */models/*/world_model.json */models/*/vae.json */*.metrics.jsonl \
    *.csv *.log progress 2>/dev/null
  ls -la results.tar.gz; exit 0
fi
if [ "${2:-}" = wait ]; then  # wait up to $3 s for the run to finish, then pack what is there
  end=$(( $(date +%s) + ${3:-540} ))
  while [ "$(date +%s)" -lt "$end" ] && ! grep -q "all done" "$out/progress" 2>/dev/null; do sleep 5; done
  cat "$out/progress"; for f in "$out"/*.job.log; do tail -n 3 "$f"; done
  exec bash "$0" "$out" pack
fi
read -r -a games <<< "${2:-Breakout}"
preset=${PRESET:-gpu}
start=$(date +%s)
mark() { echo "$(( $(date +%s) - start )) s: $*" >> "$out/progress"; }
# GPU utilisation every 0.5 s for the whole run (a stage's share is cut out by its metric times).
nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader -lms 500 \
  > "$out/gpu_util.csv" 2>/dev/null &
smi=$!
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$ngpu" -gt 0 ] && [ "${#games[@]}" -gt "$ngpu" ]; then
  echo "gpu_run.sh: ${#games[@]} games but $ngpu GPUs: name at most one game per GPU" >&2; exit 2
fi
if [ "${#games[@]}" -gt 1 ]; then  # one head for all games, so that Ray hands each job its own GPU
  ray start --head --num-cpus "$(nproc)" --num-gpus "$ngpu" --include-dashboard false \
    --disable-usage-stats > "$out/ray_head.log" 2>&1 && export RAY_ADDRESS=auto
fi
mark "pipeline start (${games[*]}, preset $preset, $ngpu GPUs)"
pids=()
for g in "${games[@]}"; do
  python pipeline/run_all.py --preset "$preset" --games "$g" --out "$out/$g" --stages collect vae dit evaluate 2>&1 | \
    grep --line-buffered -v -E "Warning|warn\(|DeprecationWarning|Stella|A\.L\.E" > "$out/$g.job.log" &
  pids+=($!)
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  if grep -q '\[run_all\] finished' "$out/${games[$i]}.job.log"; then mark "pipeline ${games[$i]} ok"
  else mark "pipeline ${games[$i]} FAILED"; fi
done
[ -n "${RAY_ADDRESS:-}" ] && ray stop > /dev/null 2>&1 && unset RAY_ADDRESS
kill $smi 2>/dev/null
if [ "${BENCH:-1}" = 0 ]; then mark "all done"; exit 0; fi
g=${games[0]}
wm="$out/$g/models/dit-$g"
python -m benchmarks.bench_generate --world-model "$wm" --batch-sizes 1 64 256 --sample-steps 8 \
  --compile eager --out "$out/bench_generate.csv" > "$out/bench_generate.log" 2>&1
mark "bench_generate exit $?"
python -m benchmarks.bench_multistep --multi-frame "$wm" --data-root "$out/$g/data" --game "$g" \
  --horizons 4 8 16 --max-windows 128 --batch-size 32 --out "$out/bench_multistep.csv" > "$out/bench_multistep.log" 2>&1
mark "bench_multistep exit $?"
python -m benchmarks.bench_train --presets S --batch-sizes 32 64 --compile eager compile --warmup 3 --steps 15 \
  --spatial-downsample 4 --latent-channels 8 --patch-size 1 4 4 --profile \
  --out "$out/bench_train.csv" > "$out/bench_train.log" 2>&1
mark "bench_train exit $?"
# Collection on the CPU cores: PPO inference on GPU shares (14 runners x 1/14), then on the CPU.
for gpus in 0.07 0; do
  python benchmarks/bench_collect.py --games Breakout Pong --steps 28000 --steps-per-round 1000 \
    --num-env-runners 14 --gpus-per-env-runner $gpus > "$out/bench_collect_gpu$gpus.log" 2>&1
  mark "bench_collect gpus=$gpus exit $?"
done
mark "all done"
