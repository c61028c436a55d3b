"""Convert the official HarmoDT / MTDiff Meta-World data (``<task>-v2/<i>.npz``) into our parquet dataset folder.

Each ``<i>.npz`` is one episode with ``observations`` (T×39), ``actions`` (T×4), ``rewards`` (T or T×1) and
``terminals`` or ``dones`` (T). Task names map from v2 to v3; near-optimal = all episodes of a task, sub-optimal =
the first half in index order (the official rule: first 1000 of 2000). ``noise_level`` is NaN and ``goal_index`` -1
(unknown). ``success`` comes from a ``success`` array when the files have one; otherwise it is stored as false and
``success_in_source: false`` in ``generation_config.json`` marks the success statistics as unknown.

With only ``dones``, a done at the last step of a 500-step episode is the time limit (a truncation; Meta-World never
terminates); other dones are terminations.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from harmodt_hf.data.folder import split_halves
from harmodt_hf.data.generation import FORMAT_VERSION, GenerationResult, start_output
from harmodt_hf.tasks import ACTION_DIM, EPISODE_LENGTH, MT50, OBSERVATION_DIM, check_task_name, resolve_tasks

_EPISODE_FILE = re.compile(r"^(\d+)\.npz$")
SUCCESS_KEYS = ("success", "successes")


def v2_to_v3(name: str) -> str:
    """``reach-v2`` → ``reach-v3`` (checked against the MT50 names)."""
    if not name.endswith("-v2"):
        raise ValueError(f"Official task folders are named '<task>-v2', got {name!r}")
    return check_task_name(name[: -len("-v2")] + "-v3")


def official_task_dirs(source: str | Path) -> dict[str, Path]:
    """v3 task name → its ``<task>-v2`` folder under ``source``, in canonical order."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"Official data folder {source} does not exist.")
    found = {v2_to_v3(d.name): d for d in source.iterdir() if d.is_dir() and not d.name.startswith(".")}
    if not found:
        raise ValueError(f"No '<task>-v2' folders in {source}: expected the official layout <task>-v2/<i>.npz.")
    return {t: found[t] for t in MT50 if t in found}


def episode_files(task_dir: Path) -> list[Path]:
    """``0.npz … (n-1).npz`` in index order; raise on holes, stray files or fewer than 2 episodes."""
    indexed = {}
    for f in task_dir.iterdir():
        if f.name.startswith("."):
            continue
        match = _EPISODE_FILE.match(f.name)
        if not match:
            raise ValueError(f"Unexpected file {f} in the official data: expected only <i>.npz episode files.")
        indexed[int(match.group(1))] = f
    missing = sorted(set(range(len(indexed))) - set(indexed))
    if missing:
        raise ValueError(f"{task_dir} misses episode files {missing[:5]} (episodes must be 0.npz … (n-1).npz).")
    if len(indexed) < 2:
        raise ValueError(f"{task_dir} holds {len(indexed)} episode(s); at least 2 are needed (one per half).")
    return [indexed[i] for i in range(len(indexed))]


def read_official_episode(path: Path, task: str, episode_index: int, require_success: bool | None = None) -> dict:
    """One official ``.npz`` episode as a row of our format (see ``data.EPISODE_FEATURES``)."""
    with np.load(path) as z:
        keys = set(z.files)
        missing = {"observations", "actions", "rewards"} - keys
        if missing or not keys & {"terminals", "dones"}:
            need = sorted(missing | ({"terminals or dones"} if not keys & {"terminals", "dones"} else set()))
            raise ValueError(f"{path} lacks {need}; it holds {sorted(keys)}.")
        obs = np.asarray(z["observations"], np.float32)
        actions = np.asarray(z["actions"], np.float32)
        rewards = np.asarray(z["rewards"], np.float32).reshape(-1)
        done_key = "terminals" if "terminals" in keys else "dones"
        dones = np.asarray(z[done_key]).reshape(-1).astype(bool)
        success_key = next((k for k in SUCCESS_KEYS if k in keys), None)
        success = np.asarray(z[success_key]).reshape(-1).astype(bool) if success_key else None
    T = len(rewards)
    if T == 0 or obs.shape != (T, OBSERVATION_DIM) or actions.shape != (T, ACTION_DIM) or dones.shape != (T,):
        raise ValueError(
            f"{path}: shapes observations {obs.shape}, actions {actions.shape}, rewards ({T},), {done_key} "
            f"{dones.shape}; expected (T, {OBSERVATION_DIM}), (T, {ACTION_DIM}), (T,), (T,) with T >= 1."
        )
    if require_success is not None and (success is not None) != require_success:
        raise ValueError(f"{path}: some episode files have a success array and others not; convert them apart.")
    terminations = dones.copy()
    if done_key == "dones" and T == EPISODE_LENGTH:
        terminations[-1] = False  # the time limit, not a termination
    truncations = np.zeros(T, bool)
    truncations[-1] = not terminations[-1]
    return dict(
        observations=obs,
        actions=actions,
        rewards=rewards,
        terminations=terminations,
        truncations=truncations,
        success=success if success is not None else np.zeros(T, bool),
        task_name=task,
        task_id=MT50.index(task),
        episode_index=episode_index,
        noise_level=float("nan"),
        goal_index=-1,
    )


def _has_success(path: Path) -> bool:
    with np.load(path) as z:
        return any(k in z.files for k in SUCCESS_KEYS)


def convert_official_dataset(
    source_dir: str | Path,
    output_dir: str | Path,
    tasks: str | Sequence[str] | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> GenerationResult:
    """Convert the official ``<task>-v2/<i>.npz`` folder (all tasks found, or ``tasks``) into a dataset folder.

    Same safety as generation: shards are written atomically, complete shards are skipped on re-runs.
    """
    start = time.perf_counter()
    dirs = official_task_dirs(source_dir)
    if tasks is not None:
        wanted = resolve_tasks(tasks)
        absent = [t for t in wanted if t not in dirs]
        if absent:
            raise ValueError(f"Tasks {absent} have no '<task>-v2' folder in {source_dir}; found: {', '.join(dirs)}.")
        dirs = {t: dirs[t] for t in MT50 if t in wanted}
    files = {task: episode_files(d) for task, d in dirs.items()}
    with_success = _has_success(next(iter(files.values()))[0])
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": "official-conversion",
        "source_path": str(Path(source_dir).resolve()),
        "sub_optimal_rule": "first half: episodes [0, N // 2) of each task, in file index order",
        "success_in_source": with_success,
        "tasks": list(files),  # for the resume command of an interrupted conversion
    }
    root = Path(output_dir)
    halves = {task: split_halves(len(task_files)) for task, task_files in files.items()}
    result, pending = start_output(root, manifest, overwrite, halves)
    from tqdm.auto import tqdm

    with tqdm(total=sum(len(r) for _, _, r in pending), unit="episode", desc="convert", disable=not progress) as bar:
        for task, half, indices in pending:
            episodes = []
            for i in indices:
                episodes.append(read_official_episode(files[task][i], task, i, require_success=with_success))
                bar.update(1)
            result.write_shard(task, half, episodes)
    from harmodt_hf.data.card import finalize_dataset

    finalize_dataset(root)
    result.seconds = time.perf_counter() - start
    return result
