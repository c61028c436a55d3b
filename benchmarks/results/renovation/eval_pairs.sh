#!/usr/bin/env bash
# bench_eval before (c8ec1c7) / after (main) alternating: old new new old old new
cd /work/bench16
for i in 1 2 3; do
  for which in old new; do
    if [ $(( i % 2 )) -eq 0 ]; then which=$([ $which = old ] && echo new || echo old); fi
    dir=$([ $which = old ] && echo /work/wt-old || echo /work/main)
    echo "=== run $i $which $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    (cd $dir && PYTHONPATH=$dir MUJOCO_GL=egl /work/main/.venv/bin/python benchmarks/bench_eval.py --episodes 3 --max-steps 50 --threads 1 --sequential-episodes 1 --no-in-process 2>&1 | grep -v Warning | tail -25)
  done
done
