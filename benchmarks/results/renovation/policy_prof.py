import cProfile
import pstats
import sys

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
policy.reset(slots)
for step in range(3):
    policy.act(rng.normal(size=(len(slots), OBSERVATION_DIM)), np.zeros(len(slots)) if step else None)
pr = cProfile.Profile()
pr.enable()
for _step in range(15):
    policy.act(rng.normal(size=(len(slots), OBSERVATION_DIM)), np.zeros(len(slots)))
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(18)
