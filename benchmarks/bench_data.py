"""Data-generation speed: episodes/s of `generate_dataset` against the bare scripted experts in the same process.

    python benchmarks/bench_data.py       # 5 tasks spread over MT50, 8 episodes each, 1 and 2 workers, best of 2
    python benchmarks/bench_data.py --tasks mt10 --episodes-per-task 8 --workers 1,2,4

Prints, in wall time and in CPU time (this process and its workers; robust when the machine is shared): the bare
expert's episodes/s including env construction (same tasks, same goals, nothing recorded) as the baseline; the
generator's rollouts and `generate_dataset` end to end (parquet shards, stats, card, plot) with their ratio to it
(goal >= 0.8); the scaling over worker counts; the CPU-hours MT50 at the official size (2000 episodes per task)
would take on one core; and the success rates the noise schedule produced. Without installing the package, prefix
`PYTHONPATH=.`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

from harmodt_hf.data import generation
from harmodt_hf.data.generation import episode_rng, expert_policy, generate_dataset, generate_episode
from harmodt_hf.envs import factory as tasks
from harmodt_hf.tasks import MT50, resolve_tasks

OFFICIAL_EPISODES = 50 * 2000


def _cold() -> None:
    generation.forget_environments()
    tasks.forget_task_goals()


def _timed(fn, *args):
    """(wall seconds, CPU seconds of this process and its finished children, result) of ``fn(*args)``."""
    t0, c0 = time.perf_counter(), os.times()
    out = fn(*args)
    t1, c1 = time.perf_counter(), os.times()
    cpu = sum(getattr(c1, k) - getattr(c0, k) for k in ("user", "system", "children_user", "children_system"))
    return t1 - t0, cpu, out


def build_envs(task_list: list[str]) -> None:
    """Build one env (and its MT1 goal list) per task from cold caches; leaves them cached."""
    _cold()
    for task in task_list:
        generation.generation_env(task, 0)


def bare_expert(task_list: list[str], n: int) -> None:
    """The bare experts play the same episodes (same envs, same goals); nothing is recorded."""
    for task in task_list:
        env, task_goals = generation.generation_env(task, 0)
        for e in range(n):
            env.set_task(task_goals[int(episode_rng(0, task, e).integers(len(task_goals)))])
            policy = expert_policy(task)
            obs, _ = env.reset()
            truncated = False
            while not truncated:
                obs, _, _, truncated, _ = env.step(policy.get_action(obs))


def rollouts_only(task_list: list[str], n: int) -> None:
    """The generator's episodes (goal draw, noise schedule, recording) in the same envs, nothing written."""
    for task in task_list:
        for e in range(n):
            generate_episode(task, e, n, seed=0)


def end_to_end(task_list: list[str], n: int, workers: int) -> dict:
    """`generate_dataset` from cold caches into a fresh folder (shards, stats, card); returns its stats."""
    _cold()
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(Path(tmp) / "ds", task_list, n, seed=0, num_workers=workers, progress=False)
        return json.loads((Path(tmp) / "ds" / "stats.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(MT50[::10]), help="task set or names (default: every 10th MT50 task)")
    p.add_argument("--episodes-per-task", type=int, default=8)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts to time end to end")
    p.add_argument("--repeats", type=int, default=2, help="best of this many interleaved runs per measurement")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="Constant")
    task_list, n = resolve_tasks(args.tasks), args.episodes_per_task
    episodes = len(task_list) * n
    worker_counts = [int(w) for w in args.workers.split(",")]
    runs = [("build", build_envs, (task_list,)), ("bare", bare_expert, (task_list, n))]
    runs += [("rollout", rollouts_only, (task_list, n))]
    runs += [(f"e2e{w}", end_to_end, (task_list, n, w)) for w in worker_counts]
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    stats: dict = {}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit every measurement
        for name, fn, fn_args in runs:
            w, c, out = _timed(fn, *fn_args)
            wall.setdefault(name, []).append(w)
            cpu.setdefault(name, []).append(c)
            if name.startswith("e2e"):
                stats = out
    wall_best = {k: min(v) for k, v in wall.items()}
    cpu_best = {k: min(v) for k, v in cpu.items()}
    print(
        f"{len(task_list)} tasks x {n} episodes of 500 steps = {episodes} episodes; best of {args.repeats}; "
        f"{os.cpu_count()} cores, load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after"
    )
    print(
        f"env construction (MT1 + env) per task: {wall_best['build'] / len(task_list):.2f} s wall, "
        f"{cpu_best['build'] / len(task_list):.2f} s CPU"
    )
    # baseline: what any generator must do at least, i.e. build the envs and play the episodes with the bare expert
    for d in (wall_best, cpu_best):
        d["bare+build"], d["rollout+build"] = d["bare"] + d["build"], d["rollout"] + d["build"]
    print("| measurement | episodes/s (wall) | ratio | episodes per CPU-second | ratio |")
    print("|---|---|---|---|---|")
    labels = {
        "bare+build": "bare scripted expert (env construction + stepping), 1 process",
        "rollout+build": "generator rollouts (construction + noise + recording), 1 process",
    }
    labels.update(
        {f"e2e{w}": f"generate_dataset end to end (+ parquet, stats, card), {w} worker(s)" for w in worker_counts}
    )
    for key, label in labels.items():
        rw, rc = episodes / wall_best[key], episodes / cpu_best[key]
        print(
            f"| {label} | {rw:.2f} | {wall_best['bare+build'] / wall_best[key]:.2f} | {rc:.2f} | "
            f"{cpu_best['bare+build'] / cpu_best[key]:.2f} |"
        )
    warm = cpu_best["bare"] / cpu_best["rollout"]
    print(f"warm envs only (no construction): generator rollouts / bare expert = {warm:.2f} (CPU)")
    first = worker_counts[0]
    for w in worker_counts[1:]:
        print(f"scaling {first} -> {w} workers (wall): x{wall_best[f'e2e{first}'] / wall_best[f'e2e{w}']:.2f}")
    if 1 in worker_counts:  # per-episode CPU cost without env construction, plus 50 constructions
        per_episode = (cpu_best["e2e1"] - cpu_best["build"]) / episodes
        hours = (OFFICIAL_EPISODES * per_episode + 50 * cpu_best["build"] / len(task_list)) / 3600
        print(
            f"MT50 at the official size ({OFFICIAL_EPISODES} episodes): ~{hours:.1f} CPU-hours (one core, end to end)"
        )
    for quality in ("sub-optimal", "near-optimal"):
        rates = [t[quality]["success_rate"] for t in stats["tasks"].values()]
        print(f"mean success over tasks, {quality}: {sum(rates) / len(rates):.2f}")
    expert = [t["expert"]["success_rate"] for t in stats["tasks"].values() if t["expert"]["num_episodes"]]
    print(f"mean success over tasks, noise-0 episodes: {sum(expert) / len(expert):.2f}")


if __name__ == "__main__":
    main()
