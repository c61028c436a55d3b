"""Batched evaluation vs the official-style sequential loop, and env-steps/s vs the simulator alone.

    python benchmarks/bench_eval.py --episodes 3 --max-steps 50 --threads 1

Model: paper size (HarmoDTConfig defaults: 6 layers, d=256, K=20, prompt 5, harmony masks) for the 10 MT10 tasks,
random weights and random stored prompts. Episodes: MT10 x ``--episodes``, ``--max-steps`` steps each, no stop on
success in either run, so both do exactly the same env steps and forwards. Baseline: one episode after another, a
batch-1 forward per step (HarmoDTPolicy with one slot, as the official Prompt-DT loop does). The batched run is
``harmodt_hf.evaluation.evaluate``. Both wall times include building the environments. The actions of both runs are
compared (max absolute difference). Then the same envs are stepped with zero actions in one process (the
simulator's own limit). Torch uses ``--threads`` threads in every run (1: bit-identical actions; robust on a
machine whose cores are shared).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from harmodt_hf import HarmoDTConfig, HarmoDTModel
from harmodt_hf.evaluation import HarmoDTPolicy, episode_reset_seed, evaluate
from harmodt_hf.tasks import MT10, _benchmark, make_env


def paper_model(seed: int = 0) -> HarmoDTModel:
    torch.manual_seed(seed)
    model = HarmoDTModel(HarmoDTConfig(task_names=list(MT10))).eval()
    config, g = model.config, torch.Generator().manual_seed(seed)
    t, p = config.num_tasks, config.prompt_length
    model.set_task_prompts(
        dict(
            states=torch.randn(t, p, config.state_dim, generator=g),
            actions=torch.rand(t, p, config.act_dim, generator=g) * 2 - 1,
            returns_to_go=torch.rand(t, p, 1, generator=g) * 4,
            timesteps=torch.arange(p).repeat(t, 1),
            attention_mask=torch.ones(t, p, dtype=torch.long),
        )
    )
    return model


def sequential(model, tasks, episodes: int, seed: int, max_steps: int) -> tuple[float, dict]:
    """The official-style loop: one episode at a time, batch-1 forward per step."""
    start = time.perf_counter()
    actions = {}
    for task in tasks:
        for e in range(episodes):
            policy = HarmoDTPolicy(model)
            policy.reset([task])
            env = make_env(task, e, seed)
            obs, _ = env.reset(seed=episode_reset_seed(seed, task, e))
            reward, taken = None, []
            for _ in range(max_steps):
                action = policy.act(obs[None], None if reward is None else [reward])[0]
                taken.append(action)
                obs, reward, _, _, _ = env.step(action)
            actions[(task, e)] = np.array(taken)
            env.close()
    return time.perf_counter() - start, actions


def zero_action_steps(tasks, episodes: int, seed: int, max_steps: int) -> tuple[float, int]:
    """Wall time of stepping the same envs with zero actions (construction excluded), one process."""
    envs = []
    for task in tasks:
        for e in range(episodes):
            env = make_env(task, e, seed)
            env.reset(seed=episode_reset_seed(seed, task, e))
            envs.append(env)
    zero = np.zeros(4)
    start = time.perf_counter()
    for _ in range(max_steps):
        for env in envs:
            env.step(zero)
    elapsed = time.perf_counter() - start
    for env in envs:
        env.close()
    return elapsed, len(envs) * max_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = list(MT10)
    model = paper_model()
    n_env_steps = len(tasks) * args.episodes * args.max_steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} cores", flush=True)
    print(f"MT10 x {args.episodes} episodes x {args.max_steps} steps = {n_env_steps} env steps, paper-size model")

    kwargs = dict(tasks=tasks, episodes_per_task=args.episodes, seed=args.seed, stop_on_success=False)
    # Warm-up: imports, first forwards, and the env workers' forkserver (started once per process).
    evaluate(model, **kwargs, max_steps=2, num_workers=args.num_workers)
    _benchmark.cache_clear()  # every timed run builds its environments (MT1 goal lists included)
    results = evaluate(model, **kwargs, max_steps=args.max_steps, num_workers=args.num_workers, record_actions=True)
    batched = results["wall_time_s"]
    print(f"batched evaluate, {results['num_workers']} env workers: {batched:.2f} s", flush=True)
    _benchmark.cache_clear()
    local = evaluate(model, **kwargs, max_steps=args.max_steps, num_workers=0)["wall_time_s"]
    print(f"batched evaluate, envs in-process: {local:.2f} s", flush=True)
    _benchmark.cache_clear()
    seq_time, seq_actions = sequential(model, tasks, args.episodes, args.seed, args.max_steps)
    print(f"sequential loop: {seq_time:.2f} s", flush=True)
    batched_actions = {
        (task, e): np.array(results["per_task"][task]["actions"][e], dtype=np.float32)
        for task in tasks
        for e in range(args.episodes)
    }
    max_diff = max(float(np.abs(batched_actions[key] - seq_actions[key]).max()) for key in seq_actions)
    sim_time, sim_steps = zero_action_steps(tasks, args.episodes, args.seed, args.max_steps)
    assert results["env_steps"] == sim_steps == n_env_steps

    workers = results["num_workers"]
    print()
    print(f"sequential loop (batch-1 forward per step): {seq_time:8.2f} s  {n_env_steps / seq_time:8.1f} env steps/s")
    print(f"batched evaluate, {workers} env workers:       {batched:8.2f} s  {n_env_steps / batched:8.1f} env steps/s")
    print(f"batched evaluate, envs in-process:         {local:8.2f} s  {n_env_steps / local:8.1f} env steps/s")
    print(f"zero-action env stepping (1 process):      {sim_time:8.2f} s  {sim_steps / sim_time:8.1f} env steps/s")
    print(f"speed-up batched / sequential: {seq_time / batched:.2f}x (in-process envs: {seq_time / local:.2f}x)")
    print(f"batched env-steps/s as a fraction of the simulator alone: {sim_time / batched:.3f}")
    print(f"max |action difference| batched vs sequential over all steps: {max_diff:.3g}")


if __name__ == "__main__":
    main()
