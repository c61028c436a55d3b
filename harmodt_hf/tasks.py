"""Meta-World task names and sets (canonical order), without the simulator (environments: :mod:`harmodt_hf.envs`)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

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


def task_set_name(tasks: Sequence[str]) -> str | None:
    """The name (``mt5``/``mt10``/``mt30``/``mt50``) of the task set made of exactly ``tasks``, in any order."""
    return next((name for name, members in TASK_SETS.items() if sorted(members) == sorted(tasks)), None)


def tasks_argument(tasks: Sequence[str]) -> str:
    """``tasks`` as the command lines take them: the task set's name when they are one, else comma-separated."""
    return task_set_name(tasks) or ",".join(tasks)


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
