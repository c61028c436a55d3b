"""keep_freed_memory: a freed large buffer is reused instead of page-faulting afresh (checked in fresh processes)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import tiny_config

from harmodt_hf import HarmoDTModel
from harmodt_hf.training import trainer as trainer_module
from harmodt_hf.training.segments import EpisodeBuffer, SegmentDataset, SegmentSampler
from harmodt_hf.training.trainer import HarmoDTTrainer, HarmoDTTrainingArguments

PROBE = """
import json, resource, sys, torch
from harmodt_hf.allocator import keep_freed_memory
torch.set_num_threads(1)
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(5):  # a round of 40 buffers of 2 MB, as the groups of a task-grouped layer
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [torch.ones(500_000) for _ in range(40)]
    del buffers
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_buffers_are_reused_without_page_faults():
    default, kept = _probe("default"), _probe("keep")
    assert kept["applied"] is True and default["applied"] is False
    pages = 40 * 2_000_000 // 4096
    # glibc's defaults give freed memory back (when depends on the heap's state): some later round faults afresh
    assert max(default["faults"][1:]) > pages // 2
    assert max(kept["faults"][2:]) < pages // 20  # kept: from the third round on, the earlier rounds' memory


def test_trainer_applies_it_on_cpu_only_when_asked(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.append(1) or True)
    model = HarmoDTModel(tiny_config())
    rng = np.random.default_rng(0)
    rows = [
        dict(
            observations=rng.normal(size=(40, 39)).astype(np.float32),
            actions=rng.uniform(-1, 1, (40, 4)).astype(np.float32),
            rewards=rng.random(40).astype(np.float32),
            task_name=name,
        )
        for name in model.config.task_names
    ]
    sampler = SegmentSampler(EpisodeBuffer.from_episodes(rows), model.config)
    batch = model.config.num_tasks
    dataset = SegmentDataset(sampler, num_items=batch, batch_size=batch, task_sampling="all_tasks")
    for keep in (True, False):
        args = HarmoDTTrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to="none", task_sampling="all_tasks",
            per_device_train_batch_size=batch, cpu_keep_freed_memory=keep,
        )  # fmt: skip
        HarmoDTTrainer(model=model, args=args, train_dataset=dataset)
    assert calls == [1]
