#!/usr/bin/env bash
for which in old fix nofix nofix fix old old fix nofix; do
  case $which in old) dir=/work/wt-old;; fix) dir=/work/wt-fix;; nofix) dir=/work/main;; esac
  r=$(cd $dir && PYTHONPATH=$dir /work/main/.venv/bin/python /work/bench16/policy_cpu.py 2>&1 | grep RESULT)
  echo "policy $which $(date +%T) load $(cut -d' ' -f1 /proc/loadavg) $r"
done
