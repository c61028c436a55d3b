#!/usr/bin/env bash
# Prepare the GPU check (run HERE, with network to PyPI): Python 3.12 wheels the device image lacks go to .whl/
# (git-ignored via .git/info/exclude) and a small MT50 dataset to data/mt50-small. Then, with the device tool:
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl", "data/mt50-small"], timeout_s=560)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for req in metaworld==3.1.1 mujoco==3.3.0 gymnasium==1.4.0 farama-notifications glfw pyopengl datasets==5.2.0 dill \
           multiprocess; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$req"
done
du -sh .whl
if [ ! -d data/mt50-small ]; then
  . .venv/bin/activate
  python dataset_scripts/generate_metaworld.py --tasks mt50 --episodes-per-task 2 --output data/mt50-small \
    --num-workers 2 --no-progress
fi
du -sh data/mt50-small
