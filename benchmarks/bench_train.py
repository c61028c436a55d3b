"""Training throughput of HarmoDTTrainer, the time of one outer (mask) update, and the update's share of a run.

    python benchmarks/bench_train.py [--tasks 50] [--steps 12] [--threads 1] [--skip-update | --update-only] [--bf16]
        [--vs-reference] [--study benchmarks/configs/mt10_cpu.yaml]

Synthetic episodes (random arrays, 500 steps) for ``--tasks`` tasks; by default the paper model (6 layers, d=256,
K=20, prompt 5). Measures, in one process, the median optimizer-step time of the real Trainer loop for
``round_robin`` (8 samples of one task per step) and ``all_tasks`` (8 samples of every task per step), each with
HarmoDT masks and without (``mask_mode="none"``, Prompt-DT), prints samples/s and the masked/unmasked ratios; then
the wall time of ``HarmoDTTrainer.update_masks()`` for all tasks (one gradient pass per task, clipping, scores,
selection, statistics) and what share of a training run the updates take at ``t_m`` = 500 (the official code's
default interval) and 5000 (the paper's table): ``update / (t_m · step + update)`` with the masked ``round_robin``
step. With ``--vs-reference`` also the update of the ``reference`` rule (the official computation pattern) in the
same process. ``--study FILE`` takes the model size, the task sampling, the batch and ``t_m`` from a study config
(``benchmarks/configs/mt10_cpu.yaml``: 2 layers, d = 64, ``all_tasks`` batches of 40, ``t_m`` = 50; use
``--tasks 10``) and reports the share at that ``t_m``. ``--bf16`` trains (and takes the mask gradients) under bf16
autocast, as ``TrainingArguments(bf16=True)`` does; fast on CPUs with AMX, emulated and ~10x slower on CPUs without
native bf16.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import TrainerCallback
from transformers.utils import logging

from harmodt_hf import HarmoDTConfig, HarmoDTModel
from harmodt_hf.training.reference_rule import ReferenceRule
from harmodt_hf.training.segments import EpisodeBuffer, SegmentDataset, SegmentSampler
from harmodt_hf.training.trainer import HarmoDTTrainer, HarmoDTTrainingArguments

MODEL_KEYS = ("hidden_size", "n_layer", "n_head", "n_inner")


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
    buffer: EpisodeBuffer, mask_mode: str, sampling: str, batch: int, steps: int, out: str, model: dict, bf16: bool
) -> HarmoDTTrainer:
    mean, std = buffer.state_stats()
    config = HarmoDTConfig(
        task_names=buffer.task_names, mask_mode=mask_mode, state_mean=mean.tolist(), state_std=std.tolist(), **model
    )
    torch.manual_seed(0)
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
    )
    dataset = SegmentDataset(SegmentSampler(buffer, config), steps * batch, batch, task_sampling=sampling)
    return HarmoDTTrainer(model=HarmoDTModel(config), args=args, train_dataset=dataset)


def step_seconds(buffer, mask_mode: str, sampling: str, batch: int, steps: int, model: dict, bf16: bool) -> float:
    """The median optimizer-step time (after 2 warm-up steps)."""
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(buffer, mask_mode, sampling, batch, steps, out, model, bf16)
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
    return statistics.median(np.diff(timer.stamps)[2:])


def update_seconds(trainer: HarmoDTTrainer, calls: int) -> tuple[list[float], int]:
    """Wall times of ``calls`` outer updates at k = η_max / 2 (a quarter into the η bell), and that k."""
    trainer.state.max_steps, trainer.state.global_step = 1000, 251  # t = 250 of 1000: k = 50 with η_max = 100
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        record = trainer.update_masks()
        times.append(time.perf_counter() - start)
    return times, record["mask/k"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-update", action="store_true")
    parser.add_argument("--update-only", action="store_true", help="time only the outer update (3 calls)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (TrainingArguments.bf16)")
    parser.add_argument("--vs-reference", action="store_true", help="also time the reference rule's update")
    parser.add_argument("--study", type=Path, help="model size, sampling, batch and t_m of a study config")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    buffer = synthetic_buffer(args.tasks)
    model, samplings, intervals = {}, {"round_robin": 8, "all_tasks": 8 * args.tasks}, (500, 5000)
    if args.study:
        train = yaml.safe_load(args.study.read_text())["train"]
        model = {key: train[key] for key in MODEL_KEYS}
        samplings = {train["task_sampling"]: train["per_device_train_batch_size"]}
        intervals = (train["mask_update_interval"],)
    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(f"{args.study or 'paper-size'} model, {args.tasks} tasks, {args.threads} thread(s), {precision}")
    steps = {}
    for sampling, batch in () if args.update_only else samplings.items():
        count = args.steps if batch <= 8 else max(6, args.steps // 2)  # >= 3 timed steps
        plain = step_seconds(buffer, "none", sampling, batch, count, model, args.bf16)
        steps[sampling] = masked = step_seconds(buffer, "harmony", sampling, batch, count, model, args.bf16)
        print(
            f"{sampling:>12}: masked {batch / masked:7.1f} samples/s, unmasked {batch / plain:7.1f} samples/s, "
            f"time ratio masked/unmasked {masked / plain:.3f}"
        )
    if args.skip_update:
        return
    with tempfile.TemporaryDirectory() as out:
        sampling, batch = next(iter(samplings.items()))
        trainer = make_trainer(buffer, "harmony", sampling, batch, 1, out, model, args.bf16)
        times, k = update_seconds(trainer, 3 if args.update_only else 2)
        print(f"outer update for {args.tasks} tasks: {min(times):.2f} s (k={k}), runs {[round(t, 2) for t in times]}")
        step = steps.get("round_robin", steps.get(sampling))
        for interval in intervals if step else ():
            share = min(times) / (interval * step + min(times))
            print(f"  share of a run at t_m = {interval} ({sampling if args.study else 'round_robin'}): {share:.1%}")
        if args.vs_reference:
            trainer.args.update_rule = "reference"
            trainer.reference = ReferenceRule(trainer.harmodt)
            reference, _ = update_seconds(trainer, 2)
            print(
                f"reference-rule outer update (official pattern): {min(reference):.2f} s, runs "
                f"{[round(t, 2) for t in reference]}; ratio reference/harmony {min(reference) / min(times):.2f}"
            )


if __name__ == "__main__":
    main()
