"""Data-generation speed: episodes/s of `generate_dataset` against the bare scripted experts in the same process.

    python benchmarks/bench_data.py       # 10 tasks spread over MT50, 6 episodes each, 1 and 2 workers, best of 2
    python benchmarks/bench_data.py --tasks mt10 --episodes-per-task 8 --workers 1,2,4

Prints: env construction time per task; the bare expert's episodes/s (same envs, same goals, nothing recorded); the
generator's rollouts (warm envs) and `generate_dataset` end to end (cold envs, parquet shards, stats, card, plot) with
their ratio to the bare expert (goal >= 0.8); the scaling over worker counts; and the time MT50 at the official size
(2000 episodes per task) would take on one core. (Without installing the package: prefix `PYTHONPATH=.`.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

from harmodt_hf import generation, tasks
from harmodt_hf.generation import episode_rng, expert_policy, generate_dataset, generate_episode
from harmodt_hf.tasks import MT50, resolve_tasks

OFFICIAL_EPISODES = 50 * 2000


def _cold() -> None:
    generation._ENVS.clear()
    tasks._benchmark.cache_clear()


def build_envs(task_list: list[str]) -> float:
    """Seconds to build one env (and its MT1 goal list) per task, from cold caches; leaves them cached."""
    _cold()
    start = time.perf_counter()
    for task in task_list:
        generation._env_and_goals(task, 0)
    return time.perf_counter() - start


def bare_expert(task_list: list[str], n: int) -> float:
    """Seconds for the bare experts to play the same episodes (same envs, same goals), nothing recorded."""
    start = time.perf_counter()
    for task in task_list:
        env, task_goals = generation._env_and_goals(task, 0)
        for e in range(n):
            env.set_task(task_goals[int(episode_rng(0, task, e).integers(len(task_goals)))])
            policy = expert_policy(task)
            obs, _ = env.reset()
            truncated = False
            while not truncated:
                obs, _, _, truncated, _ = env.step(policy.get_action(obs))
    return time.perf_counter() - start


def rollouts_only(task_list: list[str], n: int) -> float:
    """Seconds for the generator's episodes (goal draw, noise schedule, recording) in the same envs, no writing."""
    start = time.perf_counter()
    for task in task_list:
        for e in range(n):
            generate_episode(task, e, n, seed=0)
    return time.perf_counter() - start


def end_to_end(task_list: list[str], n: int, workers: int) -> tuple[float, dict]:
    """Seconds for `generate_dataset` from cold caches into a fresh folder (shards, stats, card), and its stats."""
    _cold()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate_dataset(Path(tmp) / "ds", task_list, n, seed=0, num_workers=workers, progress=False)
        seconds = time.perf_counter() - start
        stats = json.loads((Path(tmp) / "ds" / "stats.json").read_text())
    return seconds, stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(MT50[::5]), help="task set or names (default: every 5th MT50 task)")
    p.add_argument("--episodes-per-task", type=int, default=6)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts to time end to end")
    p.add_argument("--repeats", type=int, default=2, help="best of this many interleaved runs per measurement")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="Constant")
    task_list, n = resolve_tasks(args.tasks), args.episodes_per_task
    episodes = len(task_list) * n
    worker_counts = [int(w) for w in args.workers.split(",")]
    times: dict[str, list[float]] = {}
    stats = None
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit every measurement
        times.setdefault("build", []).append(build_envs(task_list))
        times.setdefault("bare", []).append(bare_expert(task_list, n))
        times.setdefault("rollout", []).append(rollouts_only(task_list, n))
        for w in worker_counts:
            seconds, stats = end_to_end(task_list, n, w)
            times.setdefault(f"e2e{w}", []).append(seconds)
    best = {k: min(v) for k, v in times.items()}
    bare_rate = episodes / best["bare"]
    print(f"{len(task_list)} tasks x {n} episodes of 500 steps = {episodes} episodes; best of {args.repeats}")
    print(f"env construction (MT1 + env, per task): {best['build'] / len(task_list):.2f} s")
    print("| measurement | episodes/s | ratio to bare expert |")
    print("|---|---|---|")
    print(f"| bare scripted expert, warm envs, 1 process | {bare_rate:.2f} | 1.00 |")
    r = episodes / best["rollout"]
    print(f"| generator rollouts (noise, recording), warm envs, 1 process | {r:.2f} | {r / bare_rate:.2f} |")
    first = worker_counts[0]
    for w in worker_counts:
        r = episodes / best[f"e2e{w}"]
        scale = best[f"e2e{first}"] / best[f"e2e{w}"]
        print(
            f"| generate_dataset end to end (cold envs, parquet, stats, card), {w} worker(s) | {r:.2f} | "
            f"{r / bare_rate:.2f} (x{scale:.2f} vs {first} worker) |"
        )
    if 1 in worker_counts:  # per-episode cost without env construction, plus 50 constructions
        per_episode = (best["e2e1"] - best["build"]) / episodes
        hours = (OFFICIAL_EPISODES * per_episode + 50 * best["build"] / len(task_list)) / 3600
        print(f"MT50 at the official size ({OFFICIAL_EPISODES} episodes): ~{hours:.1f} h on one core")
    for quality in ("sub-optimal", "near-optimal"):
        rates = [t[quality]["success_rate"] for t in stats["tasks"].values()]
        print(f"mean success over tasks, {quality}: {sum(rates) / len(rates):.2f}")
    expert = [t["expert"]["success_rate"] for t in stats["tasks"].values() if t["expert"]["num_episodes"]]
    print(f"mean success over tasks, noise-0 episodes: {sum(expert) / len(expert):.2f}")


if __name__ == "__main__":
    main()
