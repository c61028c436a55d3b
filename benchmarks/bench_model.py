"""Masked-model step time vs the same model without masks (forward + backward + AdamW), one process.

    python benchmarks/bench_model.py [--tasks 50] [--per-task 8] [--repeats 7] [--rounds 3] [--threads 2] [--uneven]
        [--device cuda]

Paper-size model (6 layers, d=256, K=20, prompt 5), a batch of tasks × per-task segments with shuffled task ids
(and, with --uneven, uneven group sizes). Prints the median step time of ``mask_mode="none"``, of the masked model
on MaskedLinear's readable path (one matmul per task group, ``group_matmul="loop"``) and on its batched fast path
(one batched matmul over equal groups, ``group_matmul="batched"``; the default off the CPU), each with its ratio to
the unmasked model on the same batch. The runs alternate step by step, so machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from harmodt_hf import HarmoDTConfig, HarmoDTModel


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


def one_step(model: HarmoDTModel, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if loss.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--per-task", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--uneven", action="store_true", help="uneven group sizes (1..2×per-task)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --repeats alternating steps")
    parser.add_argument("--device", default="cpu")
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

    torch.manual_seed(0)
    plain = HarmoDTModel(HarmoDTConfig(task_names=names, mask_mode="none")).to(args.device).train()
    batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in make_batch(plain.config, task_ids).items()}
    batch["prompt"] = {k: v.to(args.device) for k, v in batch["prompt"].items()}
    masked = HarmoDTModel(HarmoDTConfig(task_names=names, mask_mode="harmony")).to(args.device).train()
    masked.load_state_dict(plain.state_dict(), strict=False)
    runs = {"none": (plain, None), "masked, loop": (masked, "loop"), "masked, batched": (masked, "batched")}
    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=1e-4) for m in (plain, masked)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(2 + args.rounds * args.repeats):  # 2 warm-up steps, then alternate the runs step by step
        for name, (model, mode) in runs.items():
            for layer in model.masked_layers().values():
                layer.group_matmul = mode
            seconds = one_step(model, optimizers[id(model)], batch)
            if step >= 2:
                times[name].append(seconds)
    results = {name: statistics.median(values) for name, values in times.items()}
    print(f"batch {len(task_ids)} samples, {args.tasks} tasks, threads {args.threads}, uneven={args.uneven}")
    for name, value in results.items():
        print(f"{name:>16}: {value * 1000:8.1f} ms/step   ratio vs none: {value / results['none']:.3f}")


if __name__ == "__main__":
    main()
