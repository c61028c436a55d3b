"""One policy step of the batched evaluation, alone (no environments): its wall time and where it goes.

    python benchmarks/bench_policy_step.py --device cuda --tasks mt10 --slots-per-task 25
    python benchmarks/bench_policy_step.py --model runs/bench_eval/train/final --device cuda --profile
    python benchmarks/bench_policy_step.py --tasks mt10 --slots-per-task 3 --precisions fp32 --compare-weight-cache

``HarmoDTPolicy.act`` for one wave of a pipelined evaluation (``--slots-per-task`` episodes of every task; MT10 x 25
is one of the two waves of MT10 x 50), on random observations, after ``--warmup`` steps: the mean time per call
(synchronised with the device), in fp32 and bf16, for equal task groups (every slot running) and for unequal ones
(``--drop`` of the slots of every other task ended, as with stop on success). The ratio printed is each case
against fp32 with equal groups, measured in the same process. ``--profile`` adds a ``torch.profiler`` table of one
step per case (host time per op and, on a GPU, device time), to see whether a step is bound by the host (op
dispatch, synchronisations) or by the device. ``--compare-weight-cache`` also times a copy of the model whose policy
does not keep the masked weights between steps (MaskedLinear's readable path, ``W ⊙ M[t]`` rebuilt at every call),
alternating with the cached one step by step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time

import numpy as np
import torch
from bench_eval import paper_model

from harmodt_hf import HarmoDTModel
from harmodt_hf.evaluation.rollouts import HarmoDTPolicy
from harmodt_hf.tasks import OBSERVATION_DIM, resolve_tasks


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(policy: HarmoDTPolicy, active: np.ndarray, steps: int, warmup: int, rng) -> float:
    """Mean seconds per ``act`` over ``steps`` calls after ``warmup`` (fresh episodes, so no step limit is hit)."""
    policy.reset(policy.task_ids)
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(policy.device)
            start = time.perf_counter()
        obs = rng.normal(size=(active.size, OBSERVATION_DIM))
        policy.act(obs, np.zeros(active.size) if step else None, active=active)
    synchronize(policy.device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a trained model folder (default: paper size, random weights)")
    parser.add_argument("--tasks", default="mt10", help="task set of the random-weight model")
    parser.add_argument("--slots-per-task", type=int, default=25)
    parser.add_argument("--drop", type=float, default=0.5, help="share of slots ended in every other task")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--compare-weight-cache", action="store_true", help="also time the policy without it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        model = HarmoDTModel.from_pretrained(args.model).to(args.device).eval()
    else:
        model = paper_model(resolve_tasks(args.tasks), device=args.device)
    num_tasks = model.config.num_tasks
    slots = [t for t in range(num_tasks) for _ in range(args.slots_per_task)]
    every = np.arange(len(slots))
    per = args.slots_per_task
    kept = [i for i in every if (i // per) % 2 == 0 or i % per >= int(args.drop * per)]
    cases = {"equal groups": every, "unequal groups": np.array(kept)}
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {args.device}, {args.threads} thread(s), {num_tasks} tasks x {per} slots")
    times = {}
    if args.compare_weight_cache:
        compare_weight_cache(model, slots, args, rng)
        return
    for precision in args.precisions.split(","):
        policy = HarmoDTPolicy(model, precision=precision)
        policy.reset(slots)
        for label, active in cases.items():
            seconds = time_steps(policy, active, args.steps, args.warmup, rng)
            times[precision, label] = seconds
            base = times["fp32", "equal groups"]
            print(
                f"{precision} {label:>14} ({active.size} slots): {1000 * seconds:7.2f} ms per step "
                f"({seconds / base:.2f}x fp32 equal groups)",
                flush=True,
            )
            if args.profile:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if policy.device.type == "cuda":
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                time_steps(policy, active, 1, 1, rng)  # a fresh episode's first two steps, outside the profile
                obs = rng.normal(size=(active.size, OBSERVATION_DIM))
                with torch.profiler.profile(activities=activities) as prof:
                    policy.act(obs, np.zeros(active.size), active=active)
                    synchronize(policy.device)
                sort = "self_cuda_time_total" if policy.device.type == "cuda" else "self_cpu_time_total"
                print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=50))
    model.cache_masked_weights(False)


def compare_weight_cache(model: HarmoDTModel, slots: list[int], args, rng) -> None:
    """Alternate policy steps with the masked-weight cache (the default) and without it (a copy of the model)."""
    readable = copy.deepcopy(model)
    readable.masked_weights_cached = contextlib.nullcontext  # W ⊙ M[t] built at every forward
    for precision in args.precisions.split(","):
        policies = {"cached": HarmoDTPolicy(model, precision), "readable": HarmoDTPolicy(readable, precision)}
        times = {name: [] for name in policies}
        for policy in policies.values():
            policy.reset(slots)
        for step in range(args.warmup + args.steps):
            for name, policy in policies.items():
                obs = rng.normal(size=(len(slots), OBSERVATION_DIM))
                synchronize(policy.device)
                start = time.perf_counter()
                policy.act(obs, np.zeros(len(slots)) if step else None)
                synchronize(policy.device)
                if step >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        cached, plain = (float(np.median(times[name])) for name in policies)
        print(f"{precision}: cached {1000 * cached:.1f} ms, readable {1000 * plain:.1f} ms per step "
              f"({plain / cached:.2f}x)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
