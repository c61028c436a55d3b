"""An on-disk cache of Meta-World goal lists: ``MT1(task, seed).train_tasks`` built once per machine, not per process.

Building ``metaworld.MT1(task)`` samples the task's 50 goals through a fresh environment, in every worker that needs
them. The goal list only depends on the task, the seed and the Meta-World/MuJoCo versions, so it is stored once under
``$HARMODT_HF_CACHE`` (default ``$HF_HOME/harmodt_hf``), in a folder named after those versions. A file that cannot
be read is rebuilt and replaced; writes are atomic.

The file is plain JSON, never a pickle: a Meta-World goal is ``Task(env_name, data)`` whose ``data`` is a pickle of
``{"rand_vec": array, "env_cls": class, "partially_observable": bool}``. The cache keeps the numbers (``rand_vec``
and the flags) and rebuilds each ``Task`` from them, with the task's environment class taken from Meta-World itself,
so nothing read from the cache is ever unpickled.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

CACHE_ENV = "HARMODT_HF_CACHE"
FORMAT_VERSION = 1
ENV_CLASS_KEY = "env_cls"  # the one entry of a goal that is not plain data: restored from Meta-World, not stored
logger = logging.getLogger(__name__)


class GoalCacheError(ValueError):
    """A goal-list file that does not hold the goals asked for (foreign, edited or from another format)."""


def cache_root() -> Path:
    """The harmodt-hf cache folder: ``$HARMODT_HF_CACHE``, else ``$HF_HOME/harmodt_hf``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "harmodt_hf"


def goal_file(task_name: str, seed: int) -> Path:
    """Where the goal list of ``MT1(task_name, seed)`` is kept for the installed Meta-World and MuJoCo."""
    versions = f"metaworld-{importlib.metadata.version('metaworld')}_mujoco-{importlib.metadata.version('mujoco')}"
    return cache_root() / "metaworld_goals" / versions / f"{task_name}_seed{seed}.json"


def _plain(value: Any) -> Any:
    """A goal entry as JSON: arrays as ``{"array": [...], "dtype": ...}``, plain scalars as they are."""
    import numpy as np

    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        return {"array": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"goal entry of type {type(value).__name__} is not plain data")


def _from_plain(value: Any) -> Any:
    import numpy as np

    if isinstance(value, dict):
        if set(value) != {"array", "dtype"} or np.dtype(value["dtype"]).kind not in "fiub":
            raise GoalCacheError(f"unexpected goal entry {value!r}")
        array = np.asarray(value["array"], dtype=np.dtype(value["dtype"]))
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise GoalCacheError("non-finite goal vector")
        return array
    if isinstance(value, float) and not math.isfinite(value):
        raise GoalCacheError("non-finite goal entry")
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise GoalCacheError(f"unexpected goal entry {value!r}")


def encode_goals(task_name: str, seed: int, goals: list) -> dict:
    """The JSON content for ``MT1(task_name, seed).train_tasks`` (built in this process, so decoding it is safe)."""
    entries = []
    for goal in goals:
        if goal.env_name != task_name:
            raise TypeError(f"a goal of {goal.env_name!r} in the goal list of {task_name!r}")
        data = pickle.loads(goal.data)  # Meta-World's own object, made by MT1 in this process, never a cache file
        entries.append({key: None if key == ENV_CLASS_KEY else _plain(value) for key, value in data.items()})
    return {"format_version": FORMAT_VERSION, "task": task_name, "seed": seed, "goals": entries}


def decode_goals(task_name: str, seed: int, content: Any) -> list:
    """Rebuild the ``Task`` list from :func:`encode_goals` content; ``GoalCacheError`` if it is not that."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    from metaworld.types import Task

    expected = {"format_version": FORMAT_VERSION, "task": task_name, "seed": seed}
    if not isinstance(content, dict) or any(content.get(key) != value for key, value in expected.items()):
        raise GoalCacheError(f"not the goal list of {task_name} with seed {seed}")
    entries = content.get("goals")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise GoalCacheError("no goal list")
    goals = []
    for entry in entries:
        if ENV_CLASS_KEY not in entry or entry[ENV_CLASS_KEY] is not None:
            raise GoalCacheError("a goal without its environment-class placeholder")
        data = {
            key: ALL_V3_ENVIRONMENTS[task_name] if key == ENV_CLASS_KEY else _from_plain(value)
            for key, value in entry.items()
        }
        goals.append(Task(env_name=task_name, data=pickle.dumps(data)))
    return goals


def cached_goals(task_name: str, seed: int) -> list:
    """``MT1(task_name, seed).train_tasks``, read from the cache or built and stored there."""
    path = goal_file(task_name, seed)
    try:
        return decode_goals(task_name, seed, json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as error:  # truncated, foreign or edited: rebuild it (json errors are ValueErrors)
        logger.info("Rebuilding the goal list in %s (%s)", path, error)
    import metaworld

    goals = list(metaworld.MT1(task_name, seed=seed).train_tasks)
    try:
        content = json.dumps(encode_goals(task_name, seed, goals))
    except TypeError as error:  # a Meta-World version whose goals hold more than plain data: keep them uncached
        logger.warning("Not caching the goal list of %s (%s)", task_name, error)
        return goals
    _write_atomically(path, content.encode())
    return goals


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder; an unwritable cache only warns."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
            tmp_name = tmp.name
            tmp.write(data)
        os.replace(tmp_name, path)
    except OSError as error:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        logger.warning("Could not store the goal list in %s (%s): set %s to a writable folder", path, error, CACHE_ENV)
