"""Meta-World task sets (canonical order) and a goal-observable environment factory."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

from .compiled_models import reuse_compiled_models
from .goal_cache import cached_goals

# The canonical MT50 order used by MTDiff/HarmoDT (v2 names there, v3 here). MT5 and MT30 are prefixes of it.
MT50: tuple[str, ...] = tuple(
    f"{name}-v3"
    for name in (
        "basketball",
        "bin-picking",
        "button-press-topdown",
        "button-press",
        "button-press-wall",
        "coffee-button",
        "coffee-pull",
        "coffee-push",
        "dial-turn",
        "disassemble",
        "door-close",
        "door-lock",
        "door-open",
        "door-unlock",
        "hand-insert",
        "drawer-close",
        "drawer-open",
        "faucet-open",
        "faucet-close",
        "handle-press-side",
        "handle-press",
        "handle-pull-side",
        "handle-pull",
        "lever-pull",
        "peg-insert-side",
        "pick-place-wall",
        "pick-out-of-hole",
        "reach",
        "push-back",
        "push",
        "pick-place",
        "plate-slide",
        "plate-slide-side",
        "plate-slide-back",
        "plate-slide-back-side",
        "soccer",
        "push-wall",
        "shelf-place",
        "sweep-into",
        "sweep",
        "window-open",
        "window-close",
        "assembly",
        "button-press-topdown-wall",
        "hammer",
        "peg-unplug-side",
        "reach-wall",
        "stick-push",
        "stick-pull",
        "box-close",
    )
)
MT5: tuple[str, ...] = MT50[:5]
MT30: tuple[str, ...] = MT50[:30]
# Meta-World's own MT10 set, in metaworld.MT10's order.
MT10: tuple[str, ...] = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)
# Tasks of MT50 outside MT30: the held-out set for unseen-task experiments.
HELD_OUT_MT30: tuple[str, ...] = MT50[30:]

TASK_SETS: dict[str, tuple[str, ...]] = {"mt5": MT5, "mt10": MT10, "mt30": MT30, "mt50": MT50}

EPISODE_LENGTH = 500
OBSERVATION_DIM = 39
ACTION_DIM = 4


def check_task_name(name: str) -> str:
    """Return ``name`` if it is a Meta-World v3 task; otherwise raise ``ValueError`` listing close names."""
    if name in MT50:
        return name
    if f"{name}-v3" in MT50:
        raise ValueError(f"Unknown task {name!r}: Meta-World v3 task names end in '-v3' (did you mean {name}-v3?)")
    close = difflib.get_close_matches(name, MT50, n=3, cutoff=0.5)
    hint = f" Close names: {', '.join(close)}." if close else " See harmodt_hf.tasks.MT50 for all 50 names."
    raise ValueError(f"Unknown Meta-World task {name!r}.{hint}")


def resolve_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Turn a task-set name (``mt5``/``mt10``/``mt30``/``mt50``), one task, or a list of tasks into task names."""
    if isinstance(tasks, str):
        key = tasks.strip().lower()
        if key in TASK_SETS:
            return list(TASK_SETS[key])
        tasks = [t for t in tasks.split(",") if t.strip()]
    names = [check_task_name(str(t).strip()) for t in tasks]
    if not names:
        raise ValueError("No task given: pass a task set (mt5, mt10, mt30, mt50) or task names.")
    if len(set(names)) != len(names):
        raise ValueError(f"Task list has duplicates: {names}")
    return names


class _TaskGoals(NamedTuple):
    """What ``make_env`` needs of ``MT1(task, seed)``: the task's env class and its goal list."""

    env_class: type
    goals: list


@lru_cache(maxsize=64)
def _benchmark(task_name: str, seed: int) -> _TaskGoals:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return _TaskGoals(ALL_V3_ENVIRONMENTS[task_name], cached_goals(task_name, seed))


def goals(task_name: str, seed: int = 0) -> list:
    """The task's goal list (``MT1(task).train_tasks``, 50 goals), as the official evaluation uses; kept on disk
    after the first build (:mod:`harmodt_hf.goal_cache`)."""
    return list(_benchmark(check_task_name(task_name), seed).goals)


def make_env(task_name: str, goal_index: int = 0, seed: int = 0):
    """A goal-observable Meta-World v3 env (39-dim obs) set to goal ``goal_index`` of ``MT1(task_name, seed)``.

    Episodes last ``EPISODE_LENGTH`` steps; ``info['success']`` reports success. The MuJoCo model is compiled once
    per task and process and copied for each environment (:mod:`harmodt_hf.compiled_models`).
    """
    bench = _benchmark(check_task_name(task_name), seed)
    if not 0 <= goal_index < len(bench.goals):
        raise ValueError(f"goal_index must be in [0, {len(bench.goals)}), got {goal_index}")
    with reuse_compiled_models():
        env = bench.env_class()
    env.set_task(bench.goals[goal_index])
    return env
