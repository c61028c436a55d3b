#!/usr/bin/env bash
# 1) policy step CPU time, old vs new (after the acting fix); 2) training step CPU time, old vs new with glibc MALLOC_* vars
for which in old new new old old new; do
  dir=$([ $which = old ] && echo /work/wt-old || echo /work/main)
  r=$(cd $dir && PYTHONPATH=$dir /work/main/.venv/bin/python /work/bench16/policy_cpu.py 2>&1 | grep RESULT)
  echo "policy $which $(date +%T) load $(cut -d' ' -f1 /proc/loadavg) $r"
done
for which in old newmalloc newmalloc old old newmalloc; do
  dir=$([ $which = old ] && echo /work/wt-old || echo /work/main)
  echo "=== $which $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
  if [ $which = old ]; then
    (cd $dir && PYTHONPATH=$dir /work/main/.venv/bin/python /work/bench16/cpu_steps.py $which 2>&1 | grep "samples/CPU-s")
  else
    (cd $dir && MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_MMAP_THRESHOLD_=33554432 PYTHONPATH=$dir /work/main/.venv/bin/python /work/bench16/cpu_steps.py $which 2>&1 | grep "samples/CPU-s")
  fi
done
