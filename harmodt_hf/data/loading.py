"""Episode datasets: the parquet row format, loading through ``datasets.load_dataset``, schema checks, stats.

One row is one episode. Columns (``EPISODE_FEATURES``): ``observations`` (T×39 float32), ``actions`` (T×4 float32),
``rewards``/``terminations``/``truncations``/``success`` (length T), ``task_name``, ``task_id`` (index in the
canonical MT50 order), ``episode_index``, ``noise_level`` (NaN where unknown) and ``goal_index`` (-1 where unknown).
A dataset folder declares its configs (``<set>-near-optimal``, ``<task>-sub-optimal``, …) in its README YAML, so plain
``datasets.load_dataset(folder, config)`` works; ``stats.json`` beside the data holds per-task statistics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Features, List, Value, load_dataset

from harmodt_hf.tasks import ACTION_DIM, OBSERVATION_DIM, check_task_name

EPISODE_FEATURES = Features(
    {
        "observations": List(List(Value("float32"), length=OBSERVATION_DIM)),
        "actions": List(List(Value("float32"), length=ACTION_DIM)),
        "rewards": List(Value("float32")),
        "terminations": List(Value("bool")),
        "truncations": List(Value("bool")),
        "success": List(Value("bool")),
        "task_name": Value("string"),
        "task_id": Value("int64"),
        "episode_index": Value("int64"),
        "noise_level": Value("float32"),
        "goal_index": Value("int64"),
    }
)
QUALITIES: tuple[str, ...] = ("near-optimal", "sub-optimal")
STATS_FILENAME = "stats.json"


def describe_episode_format() -> str:
    """The expected columns and their ``datasets`` types, one per line (used in error messages)."""
    return "\n".join(f"  {name}: {feature!r}" for name, feature in EPISODE_FEATURES.items())


def check_episode_schema(ds: Any) -> None:
    """Raise ``ValueError`` naming every missing or mistyped column of ``ds`` (a ``Dataset`` or its ``Features``).

    Extra columns are allowed.
    """
    features = ds if isinstance(ds, Features) else getattr(ds, "features", None)
    if features is None:
        raise ValueError(f"Cannot check the episode schema of {type(ds).__name__}: it has no `features`.")
    problems = []
    for name, expected in EPISODE_FEATURES.items():
        if name not in features:
            problems.append(f"missing column {name!r}")
        elif features[name] != expected:
            problems.append(f"column {name!r} has type {features[name]!r}, expected {expected!r}")
    if problems:
        raise ValueError(
            "Not a Meta-World episode dataset: "
            + "; ".join(problems)
            + ".\nExpected one episode per row with columns:\n"
            + describe_episode_format()
            + "\nGenerate data with harmodt-generate-data or convert the official data with harmodt-convert-official."
        )


def _local_configs(folder: Path) -> list[str] | None:
    """Config names declared in a local dataset folder's README YAML, or ``None`` if it declares none."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    import yaml

    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return None
    header = text.split("---", 2)[1]
    meta = yaml.safe_load(header) or {}
    configs = meta.get("configs")
    return [c["config_name"] for c in configs] if configs else None


def load_metaworld_dataset(path_or_repo_id: str | os.PathLike, config: str, split: str = "train", **kwargs) -> Dataset:
    """Load one config (e.g. ``"mt10-near-optimal"``) of a Meta-World episode dataset with ``datasets.load_dataset``.

    ``path_or_repo_id`` is a local dataset folder or a Hub dataset repo id; ``kwargs`` go to ``load_dataset``.
    The result is checked with :func:`check_episode_schema`.
    """
    local = Path(path_or_repo_id)
    if local.is_dir():
        names = _local_configs(local)
        if names is None:
            raise ValueError(
                f"{local} has no README.md with a `configs:` section; it is not a dataset folder written by "
                "harmodt-generate-data or harmodt-convert-official."
            )
        if config not in names:
            raise ValueError(f"Config {config!r} is not in {local}. Available configs: {', '.join(names)}.")
        path_or_repo_id = str(local)
    ds = load_dataset(str(path_or_repo_id), config, split=split, **kwargs)
    check_episode_schema(ds)
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
