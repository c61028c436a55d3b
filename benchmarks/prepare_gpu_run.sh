#!/usr/bin/env bash
# Prepare the GPU check (run HERE, with network to PyPI). The device image has torch, transformers and accelerate but
# no Meta-World; it has no network. This script:
#   1. downloads the Python 3.12 wheels it lacks to .whl/ (git-ignored via .git/info/exclude);
#   2. installs them into a folder and packs it as .gpu_carry/site.tar.xz (xz: ~41 MB instead of 46 MB of wheels;
#      PyOpenGL is left out, only rendering needs it), which gpu_run.sh unpacks instead of installing wheels;
#   3. packs the trained benchmark model runs/bench_eval/train/final (benchmarks/configs/eval_model.yaml), when
#      present, as .gpu_carry/eval_model.tar.xz (~24 MB), which gpu_run.sh unpacks when EVAL_MODEL names it;
#   4. generates a small MT50 dataset to data/mt50-small (for gpu_bench.py).
# The device tool carries at most 64 MiB, so carry .gpu_carry (site + model, ~62 MiB) OR .whl + data/mt50-small:
#   run(command="bash benchmarks/gpu_run.sh", carry=[".gpu_carry", "data/mt50-small"], timeout_s=560)
set -euo pipefail
cd "$(dirname "$0")/.."
for path in /.whl/ /.gpu_carry/; do
  grep -qx "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
mkdir -p .whl .gpu_carry
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for req in metaworld==3.1.1 mujoco==3.3.0 gymnasium==1.4.0 farama-notifications glfw pyopengl datasets==5.2.0 dill \
           multiprocess; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$req"
done
du -sh .whl
site=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site/site" --only-binary=:all: \
  --python-version 3.12 --implementation cp "${platforms[@]}" $(ls .whl/*.whl | grep -v -i pyopengl)
tar cf - -C "$site" site | xz -9 -T0 > .gpu_carry/site.tar.xz
rm -rf "$site"
if [ -d runs/bench_eval/train/final ]; then
  tar cf - -C runs/bench_eval/train final | xz -9 -T0 > .gpu_carry/eval_model.tar.xz
fi
du -sh .gpu_carry
if [ ! -d data/mt50-small ]; then
  . .venv/bin/activate
  python dataset_scripts/generate_metaworld.py --tasks mt50 --episodes-per-task 2 --output data/mt50-small \
    --num-workers 2 --no-progress
fi
du -sh data/mt50-small
