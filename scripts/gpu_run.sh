#!/usr/bin/env bash
# The GPU-machine run behind docs/results.md: the `gpu` preset of the pipeline on one or more
# games (collect with PPO on the CPU cores, VAE + DiT on a GPU, evaluation at 210x160), then the
# generation, training-throughput, multi-frame-vs-single-step and collection benchmarks.
#   . scripts/device_env.sh && bash scripts/gpu_run.sh /tmp/gpurun [Breakout | "Pong DemonAttack"]
# Each game's pipeline writes under $1/<game>/. Several games run at once on one Ray head that
# holds every GPU of the machine (each training job and evaluation takes one GPU), so a 2-GPU
# machine does two games in the time of one. GPUs beyond one per game run the generation and
# training benchmarks (random weights of the gpu preset's shapes) while the pipelines run. Then,
# per game and on its own GPU: its DiT snapshot at 240 s and its final DiT at 4 Euler steps are
# scored on the final model's windows, and the multi-frame-vs-single-step benchmark runs.
# COLLECT_BENCH=0 skips the collection benchmarks at the end.
# `bash scripts/gpu_run.sh $1 pack` makes $1/results.tar.gz of the small files (logs, metrics,
# tables, figures) while or after it runs; `... $1 wait 540` waits up to 540 s for the run to end
# first. PRESET (default gpu) and BENCH=0 (skip the benchmarks) are for trying it on a CPU machine.
set -uo pipefail
out=${1:-/tmp/gpurun}
mkdir -p "$out"
if [ "${2:-}" = pack ]; then
  cd "$out" && tar -czf results.tar.gz --exclude='*.pt' --exclude='*.parquet' \
    */stages */eval */figures */models/*/world_model.json */models/*/vae.json */*.metrics.jsonl \
    */data/runs/*.json *.csv *.log progress 2>/dev/null
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
ngames=${#games[@]}
if [ "$ngpu" -gt 0 ] && [ "$ngames" -gt "$ngpu" ]; then
  echo "gpu_run.sh: $ngames games but $ngpu GPUs: name at most one game per GPU" >&2; exit 2
fi
# The pipelines see GPUs 0..ngames-1; any GPU beyond those runs the model-free benchmarks meanwhile.
spare=()
if [ "$ngpu" -gt 0 ]; then
  for ((i = ngames; i < ngpu; i++)); do spare+=("$i"); done
  export CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((ngames - 1)))
fi
if [ "$ngames" -gt 1 ]; then  # one head for all games, so that Ray hands each job its own GPU
  ray start --head --num-cpus "$(nproc)" --num-gpus "$ngames" --include-dashboard false \
    --disable-usage-stats > "$out/ray_head.log" 2>&1 && export RAY_ADDRESS=auto
fi
mark "pipeline start (${games[*]}, preset $preset, $ngpu GPUs, spare: ${spare[*]:-none})"
pids=()
for g in "${games[@]}"; do
  python pipeline/run_all.py --preset "$preset" --games "$g" --out "$out/$g" --stages collect vae dit evaluate 2>&1 | \
    grep --line-buffered -v -E "Warning|warn\(|DeprecationWarning|Stella|A\.L\.E" > "$out/$g.job.log" &
  pids+=($!)
done
# Model-free benchmarks (random weights cost what trained ones do) on the spare GPUs, at once.
gen_bench() {  # $1: GPU; $2: world model or empty (random weights of the gpu preset's shapes)
  local src=(--dit-preset S --vae-preset small --latent-channels 8 --temporal-kernel 1 --patch-size 1 4 4)
  [ -n "$2" ] && src=(--world-model "$2")
  CUDA_VISIBLE_DEVICES=$1 python -m benchmarks.bench_generate "${src[@]}" --batch-sizes 1 64 256 --sample-steps 4 8 \
    --compile eager compile cudagraphs --profile --out "$out/bench_generate.csv" > "$out/bench_generate.log" 2>&1
  mark "bench_generate exit $?"
}
train_bench() {  # $1: GPU
  CUDA_VISIBLE_DEVICES=$1 python -m benchmarks.bench_train --presets S --batch-sizes 32 64 128 --compile eager compile \
    --warmup 3 --steps 15 --spatial-downsample 4 --latent-channels 8 --patch-size 1 4 4 --profile \
    --out "$out/bench_train.csv" > "$out/bench_train.log" 2>&1
  mark "bench_train exit $?"
}
bench=${BENCH:-1}
bpids=()
if [ "$bench" != 0 ] && [ "${#spare[@]}" -ge 1 ]; then
  sleep "${BENCH_DELAY:-120}"  # past the collection stage, whose CPU load would slow the host side
  if [ "${#spare[@]}" -ge 2 ]; then
    gen_bench "${spare[0]}" "" & bpids+=($!)
    train_bench "${spare[1]}" & bpids+=($!)
  else
    (gen_bench "${spare[0]}" ""; train_bench "${spare[0]}") & bpids+=($!)
  fi
fi
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  if grep -q '\[run_all\] finished' "$out/${games[$i]}.job.log"; then mark "pipeline ${games[$i]} ok"
  else mark "pipeline ${games[$i]} FAILED"; fi
done
[ -n "${RAY_ADDRESS:-}" ] && ray stop > /dev/null 2>&1 && unset RAY_ADDRESS
unset CUDA_VISIBLE_DEVICES
kill $smi 2>/dev/null
if [ "$bench" = 0 ]; then mark "all done"; exit 0; fi
# The same runs after half their DiT budget (snapshot_s of the gpu preset), scored on the final
# model's held-out windows, one GPU each, at once: error against training time, measured.
spids=()
for i in "${!games[@]}"; do
  g=${games[$i]}
  snap=$(ls -d "$out/$g"/models/dit-"$g"-at*s 2>/dev/null | head -n 1)
  windows="$out/$g/eval/eval-$g/${g}_scores.npz"  # the final model's windows, scored again
  { [ -z "$snap" ] || [ ! -f "$windows" ]; } && continue
  CUDA_VISIBLE_DEVICES=$(( ngpu > 0 ? i % ngpu : 0 )) python pipeline/evaluate.py --run_dir "$out/$g" \
    --model_path "$snap" --data_root "$out/$g/data" --games "$g" --horizons 1,2,4,8,16 --stride 8 \
    --windows_of "$windows" --batch_size 32 --num_cpus 4 --use_gpu "$([ "$ngpu" -gt 0 ] && echo true || echo false)" \
    --name "eval-$(basename "$snap")" --figure_windows 0 > "$out/eval_snapshot_$g.log" 2>&1 &
  spids+=($!)
  # The final model with half the Euler steps on the same windows: what the faster sampler costs.
  CUDA_VISIBLE_DEVICES=$(( ngpu > 0 ? i % ngpu : 0 )) python pipeline/evaluate.py --run_dir "$out/$g" \
    --model_path "$out/$g/models/dit-$g" --data_root "$out/$g/data" --games "$g" --horizons 1,2,4,8,16 --stride 8 \
    --windows_of "$windows" --batch_size 32 --num_cpus 4 --use_gpu "$([ "$ngpu" -gt 0 ] && echo true || echo false)" \
    --sample_steps 4 --name "eval-$g-k4" --figure_windows 0 > "$out/eval_k4_$g.log" 2>&1 &
  spids+=($!)
done
for p in "${spids[@]}"; do wait "$p"; done
mark "snapshot evaluations done"
# Multi-frame against single-step on each game's model, one GPU each, at once.
mpids=()
for i in "${!games[@]}"; do
  g=${games[$i]}
  CUDA_VISIBLE_DEVICES=$(( ngpu > 0 ? i % ngpu : 0 )) python -m benchmarks.bench_multistep \
    --multi-frame "$out/$g/models/dit-$g" --data-root "$out/$g/data" --game "$g" --horizons 4 8 16 \
    --max-windows 128 --batch-size 32 --out "$out/bench_multistep_$g.csv" > "$out/bench_multistep_$g.log" 2>&1 &
  mpids+=($!)
done
for i in "${!mpids[@]}"; do wait "${mpids[$i]}"; mark "bench_multistep ${games[$i]} exit $?"; done
for p in "${bpids[@]}"; do wait "$p"; done
if [ "${#spare[@]}" -eq 0 ]; then  # one GPU per game and none spare: the GPU benchmarks now, in turn
  gen_bench 0 "$out/${games[0]}/models/dit-${games[0]}"
  train_bench 0
fi
if [ "${COLLECT_BENCH:-1}" = 1 ]; then
  # Collection: 14 runners with PPO inference on 1/14-GPU shares, 32 envs a runner (a batch that
  # amortises the GPU's per-call latency), then 8 (run 2's setting, on this machine).
  for envs in 32 8; do
    python benchmarks/bench_collect.py --games Breakout Pong --steps 64000 --steps-per-round 16000 \
      --num-env-runners 14 --num-envs-per-env-runner $envs --gpus-per-env-runner 0.07 \
      > "$out/bench_collect_gpu_envs$envs.log" 2>&1
    mark "bench_collect gpus=0.07 envs=$envs exit $?"
  done
fi
mark "all done"
