"""Training throughput of HarmoDTTrainer at the paper model size, and the time of one outer (mask) update.

    python benchmarks/bench_train.py [--tasks 50] [--steps 12] [--threads 1] [--skip-update | --update-only] [--bf16]
        [--glibc-defaults] [--vs-reference]

Synthetic episodes (random arrays, 500 steps) for ``--tasks`` tasks; the paper model (6 layers, d=256, K=20,
prompt 5). Measures, in one process, the median optimizer-step time of the real Trainer loop for
``round_robin`` (8 samples of one task per step) and ``all_tasks`` (8 samples of every task per step), each with
HarmoDT masks and without (``mask_mode="none"``, Prompt-DT), prints samples/s and the masked/unmasked ratios; then
the wall time of ``HarmoDTTrainer.update_masks()`` for all tasks (one task-grouped gradient pass + scoring +
selection); with ``--vs-reference`` also that of the ``reference`` rule, which computes the way the official code
does (50 gradient passes of one task each, then a per-task selection over every parameter), and the ratio, both
timed in this process. ``--bf16`` trains (and takes the mask gradients) under bf16 autocast, as
``TrainingArguments(bf16=True)`` does; fast on CPUs with AMX, emulated and ~10x slower on CPUs without native bf16.
Reference on the AMX CPU of the first sessions at 1 thread (official code): ~32 samples/s inner, 14-19 s per outer
update.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.utils import logging

from harmodt_hf import HarmoDTConfig, HarmoDTModel
from harmodt_hf.training.segments import EpisodeBuffer, SegmentDataset, SegmentSampler
from harmodt_hf.training.trainer import HarmoDTTrainer, HarmoDTTrainingArguments


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def synthetic_buffer(num_tasks: int, episodes: int = 4, length: int = 500) -> EpisodeBuffer:
    rng = np.random.default_rng(0)
    rows = []
    for t in range(num_tasks):
        for _ in range(episodes):
            rows.append(
                dict(
                    observations=rng.normal(size=(length, 39)).astype(np.float32),
                    actions=rng.uniform(-1, 1, size=(length, 4)).astype(np.float32),
                    rewards=rng.random(length).astype(np.float32),
                    task_name=f"task-{t}",
                )
            )
    return EpisodeBuffer.from_episodes(rows)


def make_trainer(
    buffer: EpisodeBuffer,
    mask_mode: str,
    sampling: str,
    steps: int,
    out: str,
    bf16: bool = False,
    keep_freed_memory: bool = True,
) -> HarmoDTTrainer:
    mean, std = buffer.state_stats()
    config = HarmoDTConfig(
        task_names=buffer.task_names, mask_mode=mask_mode, state_mean=mean.tolist(), state_std=std.tolist()
    )
    torch.manual_seed(0)
    model = HarmoDTModel(config)
    sampler = SegmentSampler(buffer, config)
    batch = 8 if sampling == "round_robin" else 8 * config.num_tasks
    args = HarmoDTTrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=batch,
        task_sampling=sampling,
        mask_update_interval=10**9,  # timed separately
        learning_rate=1e-4,
        weight_decay=1e-4,
        max_grad_norm=0.25,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=bf16,
        logging_steps=10**9,
        cpu_keep_freed_memory=keep_freed_memory,
    )
    dataset = SegmentDataset(sampler, num_items=steps * batch, batch_size=batch, task_sampling=sampling)
    return HarmoDTTrainer(model=model, args=args, train_dataset=dataset)


def samples_per_second(buffer, mask_mode: str, sampling: str, steps: int, bf16: bool, keep: bool) -> float:
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(buffer, mask_mode, sampling, steps, out, bf16, keep)
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
    step_times = np.diff(timer.stamps)[2:]  # skip warm-up steps
    return trainer.args.per_device_train_batch_size / statistics.median(step_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-update", action="store_true")
    parser.add_argument("--update-only", action="store_true", help="time only the outer update (3 calls)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (TrainingArguments.bf16)")
    parser.add_argument(
        "--vs-reference",
        action="store_true",
        help="also time the outer update with update_rule='reference' (the official pattern: one gradient pass per "
        "task, per-task selection over every parameter) in the same process, and print the ratio",
    )
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="cpu_keep_freed_memory=False: glibc's own malloc thresholds (the setting is process-wide and lasting, "
        "so compare separate runs)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    buffer = synthetic_buffer(args.tasks)
    precision = "bf16 autocast" if args.bf16 else "fp32"
    keep = not args.glibc_defaults
    allocator = "freed memory kept for reuse" if keep else "glibc malloc defaults"
    print(f"paper-size model, {args.tasks} tasks, {args.threads} thread(s), {precision}, {allocator}")
    for sampling in () if args.update_only else ("round_robin", "all_tasks"):
        steps = args.steps if sampling == "round_robin" else max(6, args.steps // 2)  # >= 3 timed steps
        plain = samples_per_second(buffer, "none", sampling, steps, args.bf16, keep)
        masked = samples_per_second(buffer, "harmony", sampling, steps, args.bf16, keep)
        print(
            f"{sampling:>12}: masked {masked:7.1f} samples/s, unmasked {plain:7.1f} samples/s, "
            f"time ratio masked/unmasked {plain / masked:.3f}"
        )
    if not args.skip_update:
        with tempfile.TemporaryDirectory() as out:
            trainer = make_trainer(buffer, "harmony", "all_tasks", 1, out, args.bf16, keep)
            trainer.state.max_steps = 1000
            trainer.state.global_step = 250  # k = η_max at a quarter... sin²(π/4)·100 = 50 weights per task
            times = []
            for _ in range(3 if args.update_only else 2):
                start = time.perf_counter()
                record = trainer.update_masks()
                times.append(time.perf_counter() - start)
            print(f"outer update for {args.tasks} tasks: {min(times):.2f} s (k={record['mask/k']}), runs {times}")
            if args.vs_reference:
                trainer.args.update_rule = "reference"
                reference = []
                for _ in range(2):
                    start = time.perf_counter()
                    trainer.update_masks()
                    reference.append(time.perf_counter() - start)
                print(
                    f"reference-rule outer update (official pattern): {min(reference):.2f} s, runs {reference}; "
                    f"ratio reference/harmony {min(reference) / min(times):.2f}"
                )


if __name__ == "__main__":
    main()
