"""Episode datasets (one row per episode, see :mod:`harmodt_hf.data.schema`): loading through
``datasets.load_dataset``, schema checks, stats.

A dataset folder declares its configs (``<set>-near-optimal``, ``<task>-sub-optimal``, …) in its README YAML, so plain
``datasets.load_dataset(folder, config)`` works; ``stats.json`` beside the data holds per-task statistics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from datasets import Dataset, load_dataset

from harmodt_hf.data.folder import config_files, describe_partial
from harmodt_hf.data.schema import (
    EPISODE_FEATURES,
    QUALITIES,
    STATS_FILENAME,
    describe_episode_format,
)
from harmodt_hf.data.validation import check_episode_batches, check_episode_schema, check_shard
from harmodt_hf.tasks import check_task_name

__all__ = [
    "EPISODE_FEATURES",
    "QUALITIES",
    "STATS_FILENAME",
    "check_episode_schema",
    "describe_episode_format",
    "load_metaworld_dataset",
    "load_stats",
    "state_stats",
]


def load_metaworld_dataset(path_or_repo_id: str | os.PathLike, config: str, split: str = "train", **kwargs) -> Dataset:
    """Load one config (e.g. ``"mt10-near-optimal"``) of a Meta-World episode dataset with ``datasets.load_dataset``.

    ``path_or_repo_id`` is a local dataset folder or a Hub dataset repo id; ``kwargs`` go to ``load_dataset``. The
    data is checked (:mod:`harmodt_hf.data.validation`: every column with its type, episodes of at least one step,
    finite observations, actions and rewards): a local folder's files before loading, naming the bad file; a Hub
    dataset after loading. A partly written folder (a stopped generator) is an error that gives the command resuming
    it.
    """
    local = Path(path_or_repo_id)
    if local.is_dir():
        partial = describe_partial(local)
        if partial is not None:
            raise ValueError(partial)
        configs = config_files(local)
        if not configs:
            raise ValueError(
                f"{local} has no README.md with a `configs:` section; it is not a dataset folder written by "
                "harmodt-generate-data or harmodt-convert-official."
            )
        if config not in configs:
            raise ValueError(f"Config {config!r} is not in {local}. Available configs: {', '.join(configs)}.")
        for path in configs[config]:
            check_shard(local / path)
    ds = load_dataset(str(path_or_repo_id), config, split=split, **kwargs)
    check_episode_schema(ds)
    if not local.is_dir():
        check_episode_batches(ds.data.table.to_batches(), f"{path_or_repo_id} (config {config!r})")
    return ds


def load_stats(path_or_repo_id: str | os.PathLike) -> dict:
    """Read ``stats.json`` from a dataset folder, a path to the file itself, or a Hub dataset repo id."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        path = path / STATS_FILENAME
    elif not path.is_file():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(path_or_repo_id), STATS_FILENAME, repo_type="dataset"))
    if not path.is_file():
        raise FileNotFoundError(f"No {STATS_FILENAME} at {path}: finish (or re-run) the generation to write it.")
    return json.loads(path.read_text(encoding="utf-8"))


def state_stats(stats: dict, task: str, quality: str = "near-optimal") -> tuple[np.ndarray, np.ndarray]:
    """Per-task state mean and raw std (float32, length 39) from loaded stats; add 1e-6 to the std at use."""
    if quality not in QUALITIES:
        raise ValueError(f"quality must be one of {QUALITIES}, got {quality!r}")
    tasks = stats.get("tasks", {})
    if task not in tasks:
        check_task_name(task)
        raise KeyError(f"Task {task!r} is not in these stats; tasks present: {', '.join(tasks)}")
    entry = tasks[task][quality]
    return np.asarray(entry["state_mean"], dtype=np.float32), np.asarray(entry["state_std"], dtype=np.float32)
