#!/usr/bin/env bash
# The GPU check (device tool; see benchmarks/prepare_gpu_run.sh). Installs only carried wheels, no network.
#   1. bench_eval on MT50 x 10 episodes (the official episode count) with the model on the GPU: batched evaluation
#      (fp32 and bf16) vs the official-style batch-1 loop, timed on 1 episode per task and extrapolated;
#   2. gpu_bench: paper-size HarmoDT-F vs Prompt-DT training samples/s (bf16 autocast), peak memory, mask update.
# Each part has its own time limit, and its log is written to $OUT as it runs. Knobs (environment): EVAL_STEPS,
# EVAL_LIMIT_S, EVAL_PRECISION (bf16: fp32 and bf16 runs; fp32: fp32 only), EVAL_EXTRA (more bench_eval flags, e.g.
# --unpipelined), EVAL_EPISODES (per task, default 10), EVAL_MODEL (a trained model folder, carried: its own tasks,
# batched runs with --stop-on-success, e.g. runs/bench_eval/train/final from benchmarks/configs/eval_model.yaml with
# EVAL_EPISODES=50; unpacked from .gpu_carry/eval_model.tar.xz when absent), EVAL_LOG (log name in $OUT),
# EVAL_DEVICE (default cuda), RUN_POLICY_STEP=0 to skip the profiled policy step (bench_policy_step.py, run first,
# limit POLICY_LIMIT_S), RUN_TRAIN=0 to skip part 2, TRAIN_LIMIT_S, BUDGET_S.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .gpu_carry/site.tar.xz ]; then
  [ -d /tmp/site ] || tar xJf .gpu_carry/site.tar.xz -C /tmp
  export PYTHONPATH=/tmp/site:$PWD
elif ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}
DATA=${DATA:-data/mt50-small}
EVAL_STEPS=${EVAL_STEPS:-300}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, \
accelerate.__version__, torch.cuda.is_available())" 2>&1 | tee "$OUT/versions.txt"
EVAL_SOURCE=(--tasks mt50)
if [ -n "${EVAL_MODEL:-}" ]; then
  if [ ! -d "$EVAL_MODEL" ] && [ -f .gpu_carry/eval_model.tar.xz ]; then
    mkdir -p "$(dirname "$EVAL_MODEL")" && tar xJf .gpu_carry/eval_model.tar.xz -C "$(dirname "$EVAL_MODEL")"
  fi
  EVAL_SOURCE=(--model "$EVAL_MODEL" --stop-on-success)
fi
if [ "${RUN_POLICY_STEP:-1}" != 0 ]; then  # one policy step alone, profiled (~30 s): host- or device-bound?
  POLICY_SOURCE=(--tasks mt10)
  if [ -n "${EVAL_MODEL:-}" ]; then POLICY_SOURCE=(--model "$EVAL_MODEL"); fi
  timeout "${POLICY_LIMIT_S:-90}" python3 benchmarks/bench_policy_step.py --device "${EVAL_DEVICE:-cuda}" \
    "${POLICY_SOURCE[@]}" --slots-per-task 25 --threads 2 --profile 2>&1 | tee "$OUT/bench_policy_step.log"
fi
timeout "${EVAL_LIMIT_S:-260}" python3 benchmarks/bench_eval.py --device "${EVAL_DEVICE:-cuda}" "${EVAL_SOURCE[@]}" \
  --episodes "${EVAL_EPISODES:-10}" --max-steps "$EVAL_STEPS" --sequential-episodes 1 --no-in-process \
  --precision "${EVAL_PRECISION:-bf16}" --num-workers 14 --threads 2 ${EVAL_EXTRA:-} 2>&1 | tee "$OUT/${EVAL_LOG:-bench_eval_gpu.log}"
[ "${RUN_TRAIN:-1}" = 0 ] && exit 0
if [ ! -d "$DATA" ]; then
  python3 dataset_scripts/generate_metaworld.py --tasks mt50 --episodes-per-task 2 --output "$DATA" \
    --num-workers 14 --no-progress
fi
timeout "${TRAIN_LIMIT_S:-220}" python3 benchmarks/gpu_bench.py --dataset "$DATA" --budget-s "${BUDGET_S:-12}" \
  --eval-episodes 0 --output "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log"
