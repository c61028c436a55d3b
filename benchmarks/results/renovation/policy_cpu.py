"""CPU seconds per HarmoDTPolicy.act (paper size, MT10 x 3 slots, fp32, 1 thread), for the package on PYTHONPATH."""

import sys
import time

import numpy as np
import torch

sys.path.insert(0, "benchmarks")
from bench_eval import paper_model

from harmodt_hf.evaluation.rollouts import HarmoDTPolicy
from harmodt_hf.tasks import OBSERVATION_DIM, resolve_tasks

torch.set_num_threads(1)
model = paper_model(resolve_tasks("mt10"))
slots = [t for t in range(10) for _ in range(3)]
policy = HarmoDTPolicy(model, "fp32")
rng = np.random.default_rng(0)
cpu, wall = [], []
for _round in range(3):
    policy.reset(slots)
    for step in range(25):
        obs = rng.normal(size=(len(slots), OBSERVATION_DIM))
        c, w = time.process_time(), time.perf_counter()
        policy.act(obs, np.zeros(len(slots)) if step else None)
        if step >= 3:
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - w)
print(f"RESULT cpu_ms_median {1000 * np.median(cpu):.1f} wall_ms_median {1000 * np.median(wall):.1f}")
