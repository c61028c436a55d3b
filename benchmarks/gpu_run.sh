#!/usr/bin/env bash
# The GPU check (device tool; see benchmarks/prepare_gpu_run.sh). Installs only carried wheels, no network.
# Paper-size HarmoDT-F vs Prompt-DT on MT50 with bf16 autocast: samples/s, peak GPU memory, mask update time,
# and a short MT50 evaluation; the compact table is printed last.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export MUJOCO_GL=egl PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}
DATA=${DATA:-data/mt50-small}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if [ ! -d "$DATA" ]; then
  python3 dataset_scripts/generate_metaworld.py --tasks mt50 --episodes-per-task 2 --output "$DATA" \
    --num-workers 14 --no-progress
fi
python3 benchmarks/gpu_bench.py --dataset "$DATA" --budget-s "${BUDGET_S:-45}" --eval-episodes 1 --eval-steps 200 \
  --eval-workers 14 --output "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log"
