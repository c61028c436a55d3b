#!/usr/bin/env bash
# The GPU part of issue #15, one device call (prepared; see benchmarks/RESULTS.md "Harmony study"):
#   1. generate MT10 (100 episodes per task; sub-optimal = the first 50) with the machine's cores;
#   2. benchmarks/reproduce.py with benchmarks/configs/harmony_study_gpu.yaml: HarmoDT-R, HarmoDT-F at the official
#      dose (~2.6 % of each task's mask moved) and at ~15 %, paper-size model, paired seeds, 50 evaluation episodes per
#      task; results.json/md and figures go to $OUT;
#   3. benchmarks/bench_eval.py at the full protocol (MT10 × 50 episodes, 500 steps, stop on success) on the trained
#      HarmoDT-F model of seed 1: batched GPU evaluation vs the official-style sequential loop (the ≥ 50× goal).
# Meta-World and its wheels travel packed (benchmarks/prepare_gpu_run.sh makes .gpu_carry/site.tar.xz):
#   run(command="bash benchmarks/gpu_harmony_study.sh", carry=[".gpu_carry"], timeout_s=590)
# Knobs (environment): STEPS (training steps, default 4000), SEEDS (default "1 2"), PARALLEL (runs at a time on the
# GPU, default 3), STUDY_LIMIT_S, EVAL_LIMIT_S. SMOKE=1 runs a tiny version of every stage (for a CPU check).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .gpu_carry/site.tar.xz ]; then
  [ -d /tmp/site ] || tar xJf .gpu_carry/site.tar.xz -C /tmp
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 MUJOCO_GL=egl
OUT=${OUT:-/tmp/gpu_out}
RUN=${RUN:-/tmp/harmony_study_gpu}
mkdir -p "$OUT" "$RUN"
CONFIG=benchmarks/configs/harmony_study_gpu.yaml
if [ "${SMOKE:-0}" = 1 ]; then  # every stage, tiny: to check the script where there is no GPU
  python3 - "$CONFIG" "$RUN/config.yaml" <<'PY'
import sys, yaml
study = yaml.safe_load(open(sys.argv[1]))
study.update(episodes_per_task=4, seeds=[1], eval_every=4, eval_episodes=1, eval_num_workers=0)
study["train"].update(hidden_size=32, n_layer=1, n_head=2, n_inner=64, max_steps=4, mask_update_interval=2,
                      per_device_train_batch_size=20, use_cpu=True)
yaml.safe_dump(study, open(sys.argv[2], "w"))
PY
else
  python3 - "$CONFIG" "$RUN/config.yaml" "${STEPS:-4000}" "${SEEDS:-1 2}" <<'PY'
import sys, yaml
study = yaml.safe_load(open(sys.argv[1]))
study["seeds"] = [int(s) for s in sys.argv[4].split()]
steps = int(sys.argv[3])
study["train"].update(max_steps=steps, mask_update_interval=max(1, steps // 40))
study["eval_every"] = steps
yaml.safe_dump(study, open(sys.argv[2], "w"))
PY
fi
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc) 2>&1 | tee "$OUT/machine.txt"
start=$(date +%s)
timeout "${STUDY_LIMIT_S:-420}" python3 benchmarks/reproduce.py --config "$RUN/config.yaml" --output "$RUN" \
  --workers "$(nproc)" --threads 2 --parallel "${PARALLEL:-3}" 2>&1 | tee "$OUT/study.log"
echo "study: $(( $(date +%s) - start )) s" | tee -a "$OUT/study.log"
for f in results.json results.md success_by_arm.png moved_share.png; do
  [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/$f"
done
if [ "${SMOKE:-0}" = 1 ]; then EPISODES=1; MAX_STEPS=20; DEVICE=cpu; else EPISODES=50; MAX_STEPS=500; DEVICE=cuda; fi
timeout "${EVAL_LIMIT_S:-150}" python3 benchmarks/bench_eval.py --device "$DEVICE" \
  --model "$RUN/harmodt-f-15_seed1/final" --stop-on-success --episodes "$EPISODES" --max-steps "$MAX_STEPS" \
  --sequential-episodes 1 --no-in-process --num-workers "$(( $(nproc) - 2 ))" --threads 2 2>&1 | tee "$OUT/bench_eval.log"
