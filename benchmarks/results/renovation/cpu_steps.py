"""Scratch: per-step CPU time (time.process_time, less sensitive to other jobs than wall time) of the masked and
unmasked paper-size trainer, 10 synthetic tasks, round_robin (8 samples) and all_tasks (80 samples), 1 thread."""

import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.utils import logging

from harmodt_hf import HarmoDTConfig, HarmoDTModel
from harmodt_hf.training.segments import EpisodeBuffer, SegmentDataset, SegmentSampler
from harmodt_hf.training.trainer import HarmoDTTrainer, HarmoDTTrainingArguments

logging.set_verbosity_error()
torch.set_num_threads(1)
T = 10
rng = np.random.default_rng(0)
rows = [
    dict(
        observations=rng.normal(size=(500, 39)).astype(np.float32),
        actions=rng.uniform(-1, 1, (500, 4)).astype(np.float32),
        rewards=rng.random(500).astype(np.float32),
        task_name=f"task-{t}",
    )
    for t in range(T)
    for _ in range(4)
]
buffer = EpisodeBuffer.from_episodes(rows)
mean, std = buffer.state_stats()


class Timer(TrainerCallback):
    def __init__(self):
        self.cpu = []

    def on_step_end(self, *a, **k):
        self.cpu.append(time.process_time())


out = []
for sampling, batch, steps in (("round_robin", 8, 12), ("all_tasks", 80, 6)):
    for mode in ("harmony", "none"):
        config = HarmoDTConfig(
            task_names=buffer.task_names, mask_mode=mode, state_mean=mean.tolist(), state_std=std.tolist()
        )
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as d:
            args = HarmoDTTrainingArguments(
                output_dir=d,
                max_steps=steps,
                per_device_train_batch_size=batch,
                task_sampling=sampling,
                mask_update_interval=10**9,
                learning_rate=1e-4,
                weight_decay=1e-4,
                max_grad_norm=0.25,
                save_strategy="no",
                report_to="none",
                disable_tqdm=True,
                use_cpu=True,
                logging_steps=10**9,
            )
            trainer = HarmoDTTrainer(
                model=HarmoDTModel(config),
                args=args,
                train_dataset=SegmentDataset(
                    SegmentSampler(buffer, config), steps * batch, batch, task_sampling=sampling
                ),
            )
            timer = Timer()
            trainer.add_callback(timer)
            trainer.train()
        cpu = statistics.median(np.diff(timer.cpu)[2:])
        out.append(f"{sampling} {'masked' if mode == 'harmony' else 'unmasked'} {batch / cpu:.1f} samples/CPU-s")
print(sys.argv[1], "; ".join(out), flush=True)
