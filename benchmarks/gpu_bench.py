"""GPU check at the paper model size: training samples/s (bf16 autocast), peak memory, mask update time, MT50 eval.

    python benchmarks/gpu_bench.py --dataset data/mt50-small --budget-s 60 --output $OUT/gpu.json
    python benchmarks/gpu_bench.py --dataset data/mt50-small --smoke          # CPU dry run of the same code path

Runs on CUDA when present (else CPU). For ``all_tasks`` (8 segments of every task per step) and ``round_robin``
(8 segments of one task), trains HarmoDT-F and the unmasked Prompt-DT for ``--budget-s`` seconds each and reports the
median step time as samples/s and their ratio; then times one outer mask update for all tasks and runs a short
evaluation (``--eval-episodes`` per task, ``--eval-steps`` steps). Prints a compact table last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.utils import logging

from harmodt_hf import HarmoDTModel
from harmodt_hf.evaluation.rollouts import evaluate
from harmodt_hf.training.cli import DataArguments, ModelArguments, build_config, load_episodes
from harmodt_hf.training.segments import SegmentDataset, SegmentSampler
from harmodt_hf.training.trainer import HarmoDTTrainer, HarmoDTTrainingArguments


class TimeBudget(TrainerCallback):
    """Stops training after ``budget_s`` seconds; records the time of every step end."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        if self.stamps[-1] - self.stamps[0] > self.budget_s:
            control.should_training_stop = True


def make_trainer(buffer, variant: str, sampling: str, out: str, model_args: ModelArguments, steps: int):
    model_args = ModelArguments(**{**vars(model_args), "variant": variant})
    config = build_config(model_args, buffer)
    torch.manual_seed(0)
    model = HarmoDTModel(config)
    sampler = SegmentSampler(buffer, config)
    if config.use_prompt:
        model.set_task_prompts({k: np.asarray(v) for k, v in sampler.evaluation_prompts().items()})
    batch = 8 if sampling == "round_robin" else 8 * config.num_tasks
    cuda = torch.cuda.is_available()
    args = HarmoDTTrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=batch, task_sampling=sampling,
        mask_update_interval=10**9, learning_rate=1e-4, weight_decay=1e-4, max_grad_norm=0.25, bf16=cuda,
        use_cpu=not cuda, save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=10**9,
        dataloader_num_workers=4 if cuda else 0,
    )  # fmt: skip
    dataset = SegmentDataset(sampler, num_items=steps * batch, batch_size=batch, task_sampling=sampling)
    return HarmoDTTrainer(model=model, args=args, train_dataset=dataset)


def throughput(buffer, variant, sampling, model_args, budget_s: float) -> dict:
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(buffer, variant, sampling, out, model_args, steps=100_000)
        timer = TimeBudget(budget_s)
        trainer.add_callback(timer)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    steps = np.diff(timer.stamps)[3:] if len(timer.stamps) > 5 else np.diff(timer.stamps)
    step_s = statistics.median(steps)
    return {"samples_per_s": trainer.args.per_device_train_batch_size / step_s, "step_s": step_s,
            "steps": len(timer.stamps), "peak_gib": peak}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--dataset-config", default="mt50-near-optimal")
    parser.add_argument("--budget-s", type=float, default=60.0, help="seconds of training per measurement")
    parser.add_argument("--eval-episodes", type=int, default=1, help="0: no evaluation")
    parser.add_argument("--eval-steps", type=int, default=200)
    parser.add_argument("--eval-workers", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny model and budgets (CPU dry run)")
    args = parser.parse_args()
    logging.set_verbosity_error()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    buffer = load_episodes(DataArguments(dataset=args.dataset, dataset_config=args.dataset_config))
    model_args = ModelArguments()
    if args.smoke:
        model_args = ModelArguments(hidden_size=32, n_layer=1, n_head=2, n_inner=64)
        args.budget_s, args.eval_steps = 3.0, 20
    report: dict = {"device": device, "tasks": len(buffer.task_names), "model": vars(model_args)}
    for sampling in ("all_tasks", "round_robin"):
        masked = throughput(buffer, "harmodt-f", sampling, model_args, args.budget_s)
        plain = throughput(buffer, "prompt-dt", sampling, model_args, args.budget_s)
        report[sampling] = {"harmodt-f": masked, "prompt-dt": plain,
                            "time_ratio": plain["samples_per_s"] / masked["samples_per_s"]}  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(buffer, "harmodt-f", "all_tasks", out, model_args, steps=1000)
        trainer.state.max_steps, trainer.state.global_step = 1000, 250
        times = []
        for _ in range(2):
            start = time.perf_counter()
            record = trainer.update_masks()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        report["mask_update_s"] = min(times)
        report["mask_update_k"] = record["mask/k"]
        if args.eval_episodes <= 0:  # the evaluation speed is measured by benchmarks/bench_eval.py
            report["eval"] = None
        else:
            model = trainer.harmodt.eval()
            results = evaluate(model, tasks=buffer.task_names, episodes_per_task=args.eval_episodes,
                               max_steps=args.eval_steps, num_workers=args.eval_workers)  # fmt: skip
            report["eval"] = {"mean_success_rate": results["mean_success_rate"], "wall_time_s": results["wall_time_s"],
                              "env_steps": results["env_steps"], "episodes_per_task": args.eval_episodes,
                              "max_steps": args.eval_steps}  # fmt: skip
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))
    print(f"\n== gpu_bench on {device}, {report['tasks']} tasks, d={model_args.hidden_size} L={model_args.n_layer} ==")
    print(f"{'sampling':<12} {'HarmoDT-F samples/s':>20} {'Prompt-DT samples/s':>20} {'ratio':>6} {'peak GiB':>9}")
    for sampling in ("all_tasks", "round_robin"):
        row = report[sampling]
        print(f"{sampling:<12} {row['harmodt-f']['samples_per_s']:>20.1f} {row['prompt-dt']['samples_per_s']:>20.1f} "
              f"{row['time_ratio']:>6.2f} {row['harmodt-f']['peak_gib']:>9.2f}")  # fmt: skip
    print(f"mask update (all tasks, k={report['mask_update_k']}): {report['mask_update_s']:.2f} s")
    ev = report["eval"]
    if ev is not None:
        steps, wall, success = ev["env_steps"], ev["wall_time_s"], ev["mean_success_rate"]
        print(f"eval: {steps} env steps in {wall:.1f} s, mean success {success:.2f}")


if __name__ == "__main__":
    main()
