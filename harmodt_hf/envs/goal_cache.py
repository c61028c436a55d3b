"""An on-disk cache of Meta-World goal lists: ``MT1(task, seed).train_tasks`` built once per machine, not per process.

Building ``metaworld.MT1(task)`` samples the task's 50 goals through a fresh environment (~0.5 s per task here), and
every evaluation worker, data-generation worker and evaluation during training builds it again for its tasks. The
goal list only depends on the task, the seed and the Meta-World/MuJoCo versions, so it is stored once under
``$HARMODT_HF_CACHE`` (default ``$HF_HOME/harmodt_hf``), in a folder named after those versions, and read back
afterwards. A file that cannot be read is rebuilt and replaced; writes are atomic (a half-written file is never
read).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import pickle
import tempfile
from pathlib import Path

CACHE_ENV = "HARMODT_HF_CACHE"
logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """The harmodt-hf cache folder: ``$HARMODT_HF_CACHE``, else ``$HF_HOME/harmodt_hf``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "harmodt_hf"


def goal_file(task_name: str, seed: int) -> Path:
    """Where the goal list of ``MT1(task_name, seed)`` is kept for the installed Meta-World and MuJoCo."""
    versions = f"metaworld-{importlib.metadata.version('metaworld')}_mujoco-{importlib.metadata.version('mujoco')}"
    return cache_root() / "metaworld_goals" / versions / f"{task_name}_seed{seed}.pkl"


def cached_goals(task_name: str, seed: int) -> list:
    """``MT1(task_name, seed).train_tasks``, read from the cache or built and stored there."""
    path = goal_file(task_name, seed)
    try:
        with path.open("rb") as f:
            goals = pickle.load(f)
        if isinstance(goals, list) and goals and all(getattr(g, "env_name", None) == task_name for g in goals):
            return goals
    except Exception:  # noqa: BLE001 - missing, truncated or foreign: any failure to read means rebuild it
        pass
    import metaworld

    goals = list(metaworld.MT1(task_name, seed=seed).train_tasks)
    _write_atomically(path, pickle.dumps(goals))
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
