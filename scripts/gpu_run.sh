#!/usr/bin/env bash
# The GPU-machine run behind docs/results.md: the `gpu` preset of the pipeline on one or more
# games (collect with PPO on the CPU cores, VAE + DiT on a GPU, evaluation at 210x160), then the
# generation, training-throughput, multi-frame-vs-single-step and collection benchmarks.
#   bash scripts/gpu_run.sh /tmp/gpurun [Breakout | "Pong DemonAttack"]
# Each game's pipeline writes under $1/<game>/. Several games run at once on one Ray head that
# holds every GPU of the machine (each training job and evaluation takes one GPU), so a 4-GPU
# machine does three games in the time of one. Settings, all from the environment:
# - VARIANT="<game> <tag> <section.field=value>..." (a game of this run; several variants separated
#   by ";", one spare GPU each) trains that game's VAE and DiT again meanwhile, on the same data
#   with those settings replaced (`run_all.py --set`), under $1/<game>-<tag>/: a lever measured in
#   the same time, on the same held-out windows. A variant of `dit.` settings alone trains its DiT
#   on the pipeline's own VAE instead of a second one, so the DiTs compare on the same latents.
# - Per game, on the final model's windows, also: the DiT snapshot (snapshot_s of the preset;
#   SNAPSHOT_EVAL=0 skips it) and the final DiT with the Euler steps of EXTRA_STEPS (default "1 2";
#   "" for none); each variant's DiT with those Euler steps too. VAE_FLOOR (default 1; 0 skips it)
#   scores each game's VAE on training and held-out windows (scripts/vae_floor.py).
# - TRAIN_BENCH (default "L"; "" for none) at TRAIN_BENCH_BATCH clips (default 16): the first
#   variant's GPU times DiT training of those presets (scripts/on_ray_gpu.py: Ray holds that GPU for
#   it), after the variant has trained, while the pipelines evaluate; for a `dit.`-only variant,
#   before it trains, while the pipeline's VAE trains. TRAIN_BENCH_ARGS adds bench_train flags, e.g.
#   "--horizon-mix 1 2 4" for the gpu preset's mix of generated lengths.
# - MULTISTEP="<game> <tag>" (a variant trained for T = 1 alone) times and scores the game's own
#   DiT in multi-frame chunks against that variant one frame at a time (bench_multistep, to the
#   horizons of MULTISTEP_HORIZONS, default "4 8 16").
# - BENCH=1 then runs the multi-frame-vs-single-step benchmark per game (each game's own DiT both
#   ways), the generation benchmark, one GPU each, and the collection benchmark (COLLECT_BENCH=0
#   skips it).
# - PRESET (default gpu) and RAY_NUM_CPUS (default: the cores; more lets several smoke jobs share
#   a small CPU machine) are for trying it on a CPU machine.
# `bash scripts/gpu_run.sh $1 pack` makes $1/results.tar.gz of the small files (logs, metrics,
# tables, figures, scores) while or after it runs; `... $1 wait 540` waits up to 540 s for the run
# to end first; `python scripts/run_summary.py $1` (here or on the unpacked results) prints the
# tables of docs/results.md.
set -uo pipefail
out=${1:-/tmp/gpurun}
mkdir -p "$out"
if [ "${2:-}" = pack ]; then
  cd "$out" && tar -czf results.tar.gz --exclude='*.pt' --exclude='*.parquet' \
    */stages */eval */figures */models/*/world_model.json */models/*/vae.json */*.metrics.jsonl \
    */data/runs/*.json */vae_floor.csv *.csv *.log progress 2>/dev/null
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
  echo "gpu_run.sh: $ngames games but $ngpu GPUs: name at most one game per GPU" >&2; kill $smi 2>/dev/null; exit 2
fi
g0=${games[0]}
IFS=';' read -r -a variants <<< "${VARIANT:-}"  # "<game> <tag> <settings>...; <game> <tag> ..."
vspecs=() vkeys=()  # each variant's words, and its "<game> <tag>"
for v in "${variants[@]}"; do
  read -r -a vw <<< "$v"
  [ "${#vw[@]}" -eq 0 ] && continue
  if [ "${#vw[@]}" -lt 3 ] || [[ ! " ${games[*]} " =~ " ${vw[0]} " ]]; then
    echo "gpu_run.sh: VARIANT='${VARIANT}': '${v# }': expected '<game> <tag> <section.field=value>...' for a game of this run" >&2
    kill $smi 2>/dev/null; exit 2
  fi
  vspecs+=("${vw[*]}") vkeys+=("${vw[0]} ${vw[1]}")
done
read -r -a multistep <<< "${MULTISTEP:-}"  # game, tag of its T = 1 variant
if [ "${#multistep[@]}" -gt 0 ]; then
  ms_variant=
  for j in "${!vkeys[@]}"; do [ "${vkeys[$j]}" = "${multistep[*]}" ] && ms_variant=$j; done
  if [ "${#multistep[@]}" -ne 2 ] || [ -z "$ms_variant" ]; then
    echo "gpu_run.sh: MULTISTEP='${MULTISTEP}': expected '<game> <tag>' of a variant of this run (VARIANT='${VARIANT:-}')" >&2
    kill $smi 2>/dev/null; exit 2
  fi
fi
if [ "$ngpu" -gt 0 ] && [ $(( ngames + ${#vspecs[@]} )) -gt "$ngpu" ]; then
  echo "gpu_run.sh: $ngames games and ${#vspecs[@]} variants but $ngpu GPUs: one GPU each" >&2; kill $smi 2>/dev/null; exit 2
fi
if [ "$ngames" -gt 1 ] || [ "${#vspecs[@]}" -gt 0 ]; then  # one head for all jobs: Ray hands each its own GPU
  ray start --head --num-cpus "${RAY_NUM_CPUS:-$(nproc)}" --num-gpus "$ngpu" --include-dashboard false \
    --disable-usage-stats > "$out/ray_head.log" 2>&1 && export RAY_ADDRESS=auto
fi
gpu_flag=$([ "$ngpu" -gt 0 ] && echo true || echo false)
mark "pipeline start (${games[*]}, preset $preset, $ngpu GPUs, variants: ${VARIANT:-none})"
# A job's log without the libraries' noise.
quiet() { grep --line-buffered -v -E "Warning|warn\(|DeprecationWarning|Stella|A\.L\.E|PlacementGroupCleaner"; }
pids=()
for g in "${games[@]}"; do
  python pipeline/run_all.py --preset "$preset" --games "$g" --out "$out/$g" --stages collect vae dit evaluate 2>&1 | \
    quiet > "$out/$g.job.log" &
  pids+=($!)
done
# The preset's evaluation settings, which the pipeline's own evaluation used (windows_of needs them).
read -r eval_horizons eval_stride eval_batch eval_cpus eval_idm_steps eval_idm_pairs <<< "$(python -c "from pipeline.run_all import PRESETS
from pipeline.evaluate import EvalConfig
e, d = PRESETS['$preset']().evaluate, EvalConfig()
print(','.join(map(str, e['horizons'])), e['stride'], e.get('batch_size', 8), e.get('num_cpus', 1),
      e.get('idm_steps', d.idm_steps), e.get('idm_max_pairs', d.idm_max_pairs))")"
evaluate_on() {  # $1 game, $2 world model, $3 eval name, extra flags...: scored on the final model's windows
  local g=$1 model=$2 name=$3; shift 3
  local windows="$out/$g/eval/eval-$g/${g}_scores.npz"
  [ -d "$model" ] && [ -f "$windows" ] || { mark "$name: skipped (no model or no windows)"; return; }
  python pipeline/evaluate.py --run_dir "$out/$g" --model_path "$model" --data_root "$out/$g/data" --games "$g" \
    --horizons "$eval_horizons" --stride "$eval_stride" --windows_of "$windows" --batch_size "$eval_batch" \
    --num_cpus "$eval_cpus" --use_gpu "$gpu_flag" --name "$name" --figure_windows 0 \
    --idm_steps "$eval_idm_steps" --idm_max_pairs "$eval_idm_pairs" "$@" > "$out/$name.log" 2>&1
  mark "$name exit $?"
}
train_bench() {  # DiT training throughput (bench_train, synthetic latents of the run's shape) of the
  # presets in TRAIN_BENCH (default "L"; "" for none) at TRAIN_BENCH_BATCH clips (default 16), eager
  # and compiled, on a GPU Ray holds for it.
  [ -n "${TRAIN_BENCH-L}" ] && [ "$ngpu" -gt 0 ] || return 0
  local bench_presets
  read -r -a bench_presets <<< "${TRAIN_BENCH-L}"
  python scripts/on_ray_gpu.py --log "$out/bench_train.log" --num-cpus 4 -- python -m benchmarks.bench_train \
    --presets "${bench_presets[@]}" --batch-sizes ${TRAIN_BENCH_BATCH:-16} --compile eager compile --warmup 3 \
    --steps 15 --spatial-downsample 4 --latent-channels 8 --patch-size 1 4 4 --profile ${TRAIN_BENCH_ARGS:-} \
    --out "$out/bench_train.csv" \
    >> "$out/progress.log" 2>&1
  mark "bench_train (${bench_presets[*]}) exit $?"
}
vae_floor() {  # $1 run directory, $2 label: its VAE's error on training and held-out windows, by
  # weights, precision and latent (scripts/vae_floor.py), beside the evaluation's floor (VAE_FLOOR)
  [ -f "$1/models/vae/vae.pt" ] || { mark "vae_floor $2: skipped (no VAE)"; return 0; }
  python scripts/vae_floor.py --run-dir "$1" --windows 64 --device "$([ "$ngpu" -gt 0 ] && echo cuda || echo cpu)" \
    --out "$1/vae_floor.csv" > "$out/vae_floor_$2.log" 2>&1
  mark "vae_floor $2 exit $?"
}
run_variant() {  # $1: 0 for the first variant (it also times TRAIN_BENCH), then game, tag, settings...
  local first=$1 vg=$2 tag=$3; shift 3
  local vdir="$out/$vg-$tag" vpipe s dit_only=1
  for i in "${!games[@]}"; do [ "${games[$i]}" = "$vg" ] && vpipe=${pids[$i]}; done
  for s in "$@"; do [[ $s == dit.* ]] || dit_only=0; done
  until [ -f "$out/$vg/stages/collect.json" ]; do  # the variant trains on that pipeline's data
    kill -0 "$vpipe" 2>/dev/null || { mark "variant $tag: the $vg pipeline ended without data"; return 1; }
    sleep 5
  done
  mkdir -p "$vdir/stages" && ln -sfn "$out/$vg/data" "$vdir/data" && cp "$out/$vg/stages/collect.json" "$vdir/stages/"
  local stages="vae dit"
  if [ "$dit_only" = 1 ]; then
    # Settings of the DiT alone: it trains on the pipeline's own VAE (the same latents, one VAE
    # fewer to train); the first such variant's GPU times TRAIN_BENCH while that VAE trains.
    [ "$first" = 0 ] && train_bench
    until [ -f "$out/$vg/stages/vae.json" ]; do
      kill -0 "$vpipe" 2>/dev/null || { mark "variant $tag: the $vg pipeline ended without a VAE"; return 1; }
      sleep 5
    done
    cp "$out/$vg/stages/vae.json" "$vdir/stages/"
    stages=dit
    mark "variant $tag: training $vg's DiT on the pipeline's VAE with $*"
  else
    mark "variant $tag: training $vg's VAE and DiT with $*"
  fi
  python pipeline/run_all.py --preset "$preset" --games "$vg" --out "$vdir" --stages $stages --set "$@" 2>&1 | \
    quiet > "$vdir.job.log"
  mark "variant $tag: trained, exit ${PIPESTATUS[0]}"
  [ "$first" = 0 ] && [ "$dit_only" = 0 ] && train_bench  # while the pipelines evaluate
  until [ -f "$out/$vg/eval/eval-$vg/${vg}_scores.npz" ]; do
    kill -0 "$vpipe" 2>/dev/null || break
    sleep 5
  done
  # The variant's DiT with the pipeline's Euler steps and with each of EXTRA_STEPS, as the game's own;
  # a variant's own VAE on training and held-out windows, as the games' (VAE_FLOOR).
  local k epids_v=()
  if [ "$dit_only" = 0 ] && [ "${VAE_FLOOR:-1}" = 1 ]; then
    vae_floor "$vdir" "$vg-$tag" & epids_v+=($!)
  fi
  evaluate_on "$vg" "$vdir/models/dit-$vg" "eval-$vg-$tag" & epids_v+=($!)
  for k in ${EXTRA_STEPS-1 2}; do
    evaluate_on "$vg" "$vdir/models/dit-$vg" "eval-$vg-$tag-k$k" --sample_steps "$k" & epids_v+=($!)
  done
  wait "${epids_v[@]}"
}
vpids=()
for j in "${!vspecs[@]}"; do
  read -r -a vw <<< "${vspecs[$j]}"
  run_variant "$j" "${vw[@]}" &
  vpids+=($!)
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  if grep -q '\[run_all\] finished' "$out/${games[$i]}.job.log"; then mark "pipeline ${games[$i]} ok"
  else mark "pipeline ${games[$i]} FAILED"; fi
done
# Per game, on the final model's own windows: the same run's DiT at its snapshot (snapshot_s of the
# preset), error against training time; and the final DiT with each number of Euler steps in
# EXTRA_STEPS (default "1 2"), error against sampler cost. All at once; Ray hands out the GPUs.
epids=()
for g in "${games[@]}"; do
  snap=$([ "${SNAPSHOT_EVAL:-1}" = 1 ] && ls -d "$out/$g"/models/dit-"$g"-at*s 2>/dev/null | head -n 1)
  [ -n "$snap" ] && { evaluate_on "$g" "$snap" "eval-$(basename "$snap")" & epids+=($!); }
  for k in ${EXTRA_STEPS-1 2}; do
    evaluate_on "$g" "$out/$g/models/dit-$g" "eval-$g-k$k" --sample_steps "$k" & epids+=($!)
  done
done
if [ "${VAE_FLOOR:-1}" = 1 ]; then
  for g in "${games[@]}"; do vae_floor "$out/$g" "$g" & epids+=($!); done
fi
if [ "${#multistep[@]}" -gt 0 ]; then
  # Multi-frame against single-step on the same held-out windows: the game's own DiT in chunks of
  # its longest length, against the variant's, trained for T = 1 on the same data and VAE in the
  # same time (e.g. MULTISTEP="Breakout T1" with VARIANT="Breakout T1 dit.horizon=1 dit.horizon_choices=[1]").
  (
    g=${multistep[0]} tag=${multistep[1]}
    single="$out/$g-$tag/models/dit-$g"
    until [ -f "$single/world_model.json" ]; do  # the variant's DiT is saved when its stage ends
      kill -0 "${vpids[$ms_variant]}" 2>/dev/null || { mark "bench_multistep: variant $tag ended without a model"; exit 1; }
      sleep 5
    done
    python scripts/on_ray_gpu.py --log "$out/bench_multistep_$g.log" --num-gpus $([ "$ngpu" -gt 0 ] && echo 1 || echo 0) \
      --num-cpus 4 -- python -m benchmarks.bench_multistep --multi-frame "$out/$g/models/dit-$g" --single-step "$single" \
      --data-root "$out/$g/data" --game "$g" --horizons ${MULTISTEP_HORIZONS:-4 8 16} --max-windows 128 --batch-size 32 \
      --out "$out/bench_multistep_$g.csv" >> "$out/progress.log" 2>&1
    mark "bench_multistep $g: own DiT against $tag's, exit $?"
  ) &
  epids+=($!)
fi
for p in "${epids[@]}" "${vpids[@]}"; do wait "$p"; done
[ -n "${RAY_ADDRESS:-}" ] && ray stop > /dev/null 2>&1 && unset RAY_ADDRESS
kill $smi 2>/dev/null
if [ "${BENCH:-0}" != 1 ]; then mark "all done"; exit 0; fi
# Multi-frame against single-step on each game's model, and generation then training speed, one GPU
# each, at once.
bpids=()
for i in "${!games[@]}"; do
  g=${games[$i]}
  CUDA_VISIBLE_DEVICES=$(( ngpu > 0 ? i % ngpu : 0 )) python -m benchmarks.bench_multistep \
    --multi-frame "$out/$g/models/dit-$g" --data-root "$out/$g/data" --game "$g" --horizons 4 8 16 \
    --max-windows 128 --batch-size 32 --out "$out/bench_multistep_$g.csv" > "$out/bench_multistep_$g.log" 2>&1 &
  bpids+=($!)
done
(
  CUDA_VISIBLE_DEVICES=$(( ngpu > 0 ? ngames % ngpu : 0 )) python -m benchmarks.bench_generate \
    --world-model "$out/$g0/models/dit-$g0" --batch-sizes 1 64 256 --sample-steps 4 8 --compile eager cudagraphs \
    --out "$out/bench_generate.csv" > "$out/bench_generate.log" 2>&1
  mark "bench_generate exit $?"
) &
bpids+=($!)
for i in "${!bpids[@]}"; do wait "${bpids[$i]}"; done
mark "benchmarks done"
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
