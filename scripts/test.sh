#!/usr/bin/env bash
# The test command: set up .venv, then run ruff and the whole pytest suite (slow and multi-process tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export MUJOCO_GL=${MUJOCO_GL:-egl}
ruff check .
python -m pytest -q -p no:cacheprovider "$@"
