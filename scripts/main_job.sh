#!/usr/bin/env bash
# The README's main job on a fresh clone: set up .venv, then generate a small MT5 near-optimal dataset, train a tiny
# HarmoDT-F on the CPU, evaluate it on MT5 and write a Hub-ready model folder (card, figures, results JSON).
#   bash scripts/main_job.sh            # full job (runs/main_job), ≤ 20 min on 2 cores
#   bash scripts/main_job.sh --smoke    # reduced form of every stage (runs/main_job_smoke), about a minute
# Other options: python -m harmodt_hf.main_job --help
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export MUJOCO_GL=${MUJOCO_GL:-egl}
exec python -m harmodt_hf.main_job "$@"
