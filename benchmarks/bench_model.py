"""Masked-model step time vs the same model without masks (forward + backward + AdamW), one process.

    python benchmarks/bench_model.py [--tasks 50] [--per-task 8] [--repeats 7] [--rounds 3] [--threads 2] [--uneven]

Paper-size model (6 layers, d=256, K=20, prompt 5), a batch of tasks × per-task segments with shuffled task ids
(and, with --uneven, uneven group sizes). Prints the median step time of each masked implementation and its ratio to
``mask_mode="none"`` on the same batch (goal ≤ 1.3×).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from harmodt_hf import HarmoDTConfig, HarmoDTModel
from harmodt_hf.model.masked_linear import MaskedLinear


def make_batch(config: HarmoDTConfig, task_ids: torch.Tensor, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, k, p = len(task_ids), config.context_length, config.prompt_length
    return dict(
        states=torch.randn(b, k, config.state_dim, generator=g),
        actions=torch.rand(b, k, config.act_dim, generator=g) * 2 - 1,
        returns_to_go=torch.rand(b, k, 1, generator=g),
        timesteps=torch.randint(0, 900, (b, 1), generator=g) + torch.arange(k),
        attention_mask=torch.ones(b, k, dtype=torch.long),
        task_ids=task_ids,
        prompt=dict(
            states=torch.randn(b, p, config.state_dim, generator=g),
            actions=torch.rand(b, p, config.act_dim, generator=g) * 2 - 1,
            returns_to_go=torch.rand(b, p, 1, generator=g),
            timesteps=torch.arange(p).repeat(b, 1) + 490,
            attention_mask=torch.ones(b, p, dtype=torch.long),
        ),
        return_loss=True,
    )


def step_times(model: HarmoDTModel, batch: dict, repeats: int, warmup: int = 2) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    model.train()
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--per-task", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--uneven", action="store_true", help="uneven group sizes (1..2×per-task)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all implementations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [f"task-{i}" for i in range(args.tasks)]
    g = torch.Generator().manual_seed(0)
    if args.uneven:
        sizes = torch.randint(1, 2 * args.per_task + 1, (args.tasks,), generator=g)
        task_ids = torch.repeat_interleave(torch.arange(args.tasks), sizes)
    else:
        task_ids = torch.arange(args.tasks).repeat_interleave(args.per_task)
    task_ids = task_ids[torch.randperm(len(task_ids), generator=g)]

    results: dict[str, float] = {}
    torch.manual_seed(0)
    plain = HarmoDTModel(HarmoDTConfig(task_names=names, mask_mode="none"))
    batch = make_batch(plain.config, task_ids)
    masked = HarmoDTModel(HarmoDTConfig(task_names=names, mask_mode="harmony"))
    masked.load_state_dict(plain.state_dict(), strict=False)
    # Interleave the runs so that machine noise hits all of them alike.
    runs = {"none": [], "recompute": [], "autograd": []}
    for _ in range(args.rounds):
        runs["none"] += step_times(plain, batch, args.repeats)
        for impl in ("recompute", "autograd"):
            MaskedLinear.implementation = impl
            runs[impl] += step_times(masked, batch, args.repeats)
    MaskedLinear.implementation = "recompute"
    for name, times in runs.items():
        results[name] = statistics.median(times)
    print(f"batch {len(task_ids)} samples, {args.tasks} tasks, threads {args.threads}, uneven={args.uneven}")
    for name, value in results.items():
        print(f"{name:>10}: {value * 1000:8.1f} ms/step   ratio vs none: {value / results['none']:.3f}")


if __name__ == "__main__":
    main()
