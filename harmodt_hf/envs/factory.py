"""Goal-observable Meta-World v3 environments and their goal lists (the only place that builds a simulator)."""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from harmodt_hf.envs.compiled_models import reuse_compiled_models
from harmodt_hf.envs.goal_cache import cached_goals
from harmodt_hf.tasks import EPISODE_LENGTH, check_task_name

__all__ = ["EPISODE_LENGTH", "TaskGoals", "forget_task_goals", "goals", "make_env", "task_goals"]


class TaskGoals(NamedTuple):
    """What ``make_env`` needs of ``MT1(task, seed)``: the task's env class and its goal list."""

    env_class: type
    goals: list


@lru_cache(maxsize=64)
def task_goals(task_name: str, seed: int = 0) -> TaskGoals:
    """The env class and goal list of ``MT1(task_name, seed)``, kept for the process (and on disk, see
    :mod:`harmodt_hf.envs.goal_cache`)."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return TaskGoals(ALL_V3_ENVIRONMENTS[check_task_name(task_name)], cached_goals(task_name, seed))


def forget_task_goals() -> None:
    """Drop this process's goal lists (the next use reads the disk cache or builds ``MT1`` again)."""
    task_goals.cache_clear()


def goals(task_name: str, seed: int = 0) -> list:
    """The task's goal list (``MT1(task).train_tasks``, 50 goals), as the official evaluation uses; kept on disk
    after the first build (:mod:`harmodt_hf.envs.goal_cache`)."""
    return list(task_goals(task_name, seed).goals)


def make_env(task_name: str, goal_index: int = 0, seed: int = 0):
    """A goal-observable Meta-World v3 env (39-dim obs) set to goal ``goal_index`` of ``MT1(task_name, seed)``.

    Episodes last ``EPISODE_LENGTH`` steps; ``info['success']`` reports success. The MuJoCo model is compiled once
    per task and process and copied for each environment (:mod:`harmodt_hf.envs.compiled_models`).
    """
    bench = task_goals(task_name, seed)
    if not 0 <= goal_index < len(bench.goals):
        raise ValueError(f"goal_index must be in [0, {len(bench.goals)}), got {goal_index}")
    with reuse_compiled_models():
        env = bench.env_class()
    env.set_task(bench.goals[goal_index])
    return env
