"""The on-disk layout of an episode dataset folder and safe writes into it.

Layout (a Hub-ready dataset repo)::

    data/<task>/first-half.parquet    episodes [0, N//2)  -> the sub-optimal configs
    data/<task>/second-half.parquet   episodes [N//2, N)  -> near-optimal = both halves
    generation_config.json            the settings every shard was made with (checked on resume)
    stats.json, README.md, images/    written last by ``dataset_card.finalize_dataset``

Each shard is written to a hidden temporary name and renamed when complete, so a killed run leaves no partial
``*.parquet``; a re-run skips complete shards. Existing output is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.data_files import resolve_pattern, sanitize_patterns
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard

from harmodt_hf.data.schema import EPISODE_FEATURES
from harmodt_hf.data.validation import open_shard
from harmodt_hf.tasks import MT50, tasks_argument

HALVES: tuple[str, ...] = ("first-half", "second-half")
MANIFEST_FILENAME = "generation_config.json"
RUN_KEYS: tuple[str, ...] = ("tasks",)  # manifest entries of the latest run, not settings a resume must match
OWNED_NAMES: tuple[str, ...] = ("data", "images", "README.md", "stats.json", MANIFEST_FILENAME)
ROW_GROUP_SIZE = 100  # episodes per parquet row group (~9 MB), friendly to streaming
_TMP_SUFFIX = ".tmp"


def shard_path(root: str | os.PathLike, task: str, half: str) -> Path:
    """``root/data/<task>/<half>.parquet``."""
    return Path(root) / shard_relpath(task, half)


def shard_relpath(task: str, half: str) -> str:
    """The shard's path relative to the dataset root, with forward slashes (as README ``data_files`` need)."""
    if half not in HALVES:
        raise ValueError(f"half must be one of {HALVES}, got {half!r}")
    return f"data/{task}/{half}.parquet"


def split_halves(num_episodes: int) -> dict[str, range]:
    """Episode indices of each half: the first ``N // 2`` episodes (sub-optimal) and the rest."""
    half = num_episodes // 2
    return {"first-half": range(0, half), "second-half": range(half, num_episodes)}


def _list_array(values: np.ndarray, lengths: list[int], inner: int | None = None) -> pa.Array:
    """A list array (of fixed-size lists when ``inner`` is given) from rows concatenated into ``values``."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = pa.array(values.reshape(-1))
    items = pa.FixedSizeListArray.from_arrays(flat, inner) if inner is not None else flat
    return pa.ListArray.from_arrays(pa.array(offsets), items)


def episodes_to_table(episodes: list[dict]) -> pa.Table:
    """Episodes (dicts of numpy arrays and scalars, see ``data.EPISODE_FEATURES``) → an Arrow table with that schema."""
    if not episodes:
        raise ValueError("No episodes to write.")
    lengths = [len(ep["rewards"]) for ep in episodes]

    def cat(key: str, dtype) -> np.ndarray:
        return np.concatenate([np.asarray(ep[key], dtype=dtype) for ep in episodes])

    columns = {
        "observations": _list_array(cat("observations", np.float32), lengths, episodes[0]["observations"].shape[1]),
        "actions": _list_array(cat("actions", np.float32), lengths, episodes[0]["actions"].shape[1]),
        "rewards": _list_array(cat("rewards", np.float32), lengths),
        "terminations": _list_array(cat("terminations", np.bool_), lengths),
        "truncations": _list_array(cat("truncations", np.bool_), lengths),
        "success": _list_array(cat("success", np.bool_), lengths),
        "task_name": pa.array([ep["task_name"] for ep in episodes], pa.string()),
        "task_id": pa.array([ep["task_id"] for ep in episodes], pa.int64()),
        "episode_index": pa.array([ep["episode_index"] for ep in episodes], pa.int64()),
        "noise_level": pa.array([ep["noise_level"] for ep in episodes], pa.float32()),
        "goal_index": pa.array([ep["goal_index"] for ep in episodes], pa.int64()),
    }
    return pa.Table.from_pydict(columns).cast(EPISODE_FEATURES.arrow_schema)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to a hidden temporary file beside ``path``, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike) -> None:
    """Write ``table`` as parquet to ``path`` with :func:`write_bytes_atomic` (no partial shard is ever visible)."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, row_group_size=ROW_GROUP_SIZE)
    write_bytes_atomic(buffer.getvalue().to_pybytes(), path)


def remove_stale_temporaries(root: str | os.PathLike, tasks: list[str]) -> int:
    """Delete temporary shard files left by killed runs for ``tasks``; return how many were removed."""
    removed = 0
    for task in tasks:
        folder = Path(root) / "data" / task
        if folder.is_dir():
            for tmp in folder.glob(f".*{_TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed


def shard_is_complete(path: Path, expected_rows: int) -> bool:
    """True if the shard exists; raise if it exists with the wrong number of episodes."""
    if not path.is_file():
        return False
    rows = open_shard(path).metadata.num_rows
    if rows != expected_rows:
        raise ValueError(
            f"{path} holds {rows} episodes, expected {expected_rows}. It was not written by this configuration; "
            "pass --overwrite to regenerate the dataset."
        )
    return True


def config_files(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Each config of the folder's README.md ``configs:`` -> the files (POSIX, relative to ``folder``) its
    ``data_files`` patterns resolve to, by the rules of ``datasets.load_dataset``; ``{}`` without configs.

    ``FileNotFoundError`` names a pattern that matches no file.
    """
    folder = Path(folder).resolve()
    readme = folder / "README.md"
    configs = MetadataConfigs.from_dataset_card_data(DatasetCard.load(readme).data) if readme.is_file() else {}
    files: dict[str, list[str]] = {}
    for name, config in configs.items():
        files[name] = []
        for patterns in sanitize_patterns(config.get("data_files", [])).values():
            for pattern in patterns:
                try:
                    found = resolve_pattern(pattern, str(folder))
                except FileNotFoundError:
                    raise FileNotFoundError(
                        f"{readme}: config {name!r} reads data_files {pattern!r}, which match no file in {folder}"
                    ) from None
                files[name] += [Path(path).relative_to(folder).as_posix() for path in found]
    return files


def complete_tasks(root: str | os.PathLike) -> list[str]:
    """Tasks (canonical MT50 order) whose both halves are present under ``root/data``."""
    return [t for t in MT50 if all(shard_path(root, t, h).is_file() for h in HALVES)]


def _foreign_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name not in OWNED_NAMES and not p.name.startswith("."))


def prepare_output(root: str | os.PathLike, manifest: dict, overwrite: bool = False) -> None:
    """Make ``root`` ready to receive shards made with ``manifest``.

    A new or empty folder gets the manifest. A folder made earlier with the same settings is resumed (complete shards
    are kept; ``tasks``, the latest run's task list, may differ and is updated). A folder made with other settings
    is an error. ``overwrite`` first deletes the generated files (never
    anything else). A folder holding files this tool did not write is always an error. Hidden entries (``.git``)
    are ignored.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"Output path {root} is a file; pass a folder for the dataset.")
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / MANIFEST_FILENAME
    manifest = json.loads(json.dumps(manifest))  # tuples -> lists, as read back from disk
    foreign = _foreign_entries(root)
    if foreign:
        raise FileExistsError(
            f"Output folder {root} holds files that are not part of a generated dataset ({', '.join(foreign[:5])}). "
            "Choose a new or empty folder."
        )
    has_content = any((root / name).exists() for name in OWNED_NAMES)
    if has_content and not manifest_path.is_file():
        raise FileExistsError(
            f"Output folder {root} holds dataset files but no {MANIFEST_FILENAME}, so its settings are unknown. "
            "Choose a new or empty folder."
        )
    if manifest_path.is_file():
        existing = json.loads(manifest_path.read_text(encoding="utf-8"))
        changed = sorted(
            k for k in set(existing) | set(manifest) if k not in RUN_KEYS and existing.get(k) != manifest.get(k)
        )
        if existing == manifest and not overwrite:
            return
        if changed and not overwrite:
            raise FileExistsError(
                f"Output folder {root} holds a dataset made with other settings (differs in: {', '.join(changed)}). "
                "Pass --overwrite to replace it, or choose another folder."
            )
        if overwrite:
            for name in OWNED_NAMES:
                target = root / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    write_bytes_atomic(json.dumps(manifest, indent=2, sort_keys=True).encode(), manifest_path)


def read_manifest(root: str | os.PathLike) -> dict:
    """The settings the folder's shards were made with."""
    path = Path(root) / MANIFEST_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {root} is not a dataset folder written by harmodt_hf.")
    return json.loads(path.read_text(encoding="utf-8"))


def resume_command(root: str | os.PathLike) -> str:
    """The command that resumes (or refreshes) the dataset folder ``root``, from its ``generation_config.json``."""
    manifest = read_manifest(root)
    tasks = manifest.get("tasks")
    if manifest.get("source") == "official-conversion":
        command = f"harmodt-convert-official --source {manifest['source_path']} --output {root}"
        return command + (f" --tasks {tasks_argument(tasks)}" if tasks else "")
    command = (
        f"harmodt-generate-data --tasks {tasks_argument(tasks) if tasks else '<the tasks of the first run>'} "
        f"--episodes-per-task {manifest.get('episodes_per_task')} --seed {manifest.get('seed')} "
        f"--benchmark-seed {manifest.get('benchmark_seed')} --output {root}"
    )
    return command + " (with the --shard-index/--num-shards of the first run, if it had them)"


def describe_partial(root: str | os.PathLike) -> str | None:
    """Why ``root`` is a partly written dataset folder and how to resume it; ``None`` if it is finished.

    A folder is finished when every task of its latest run has both shards and the README, ``stats.json`` were
    written after them. Folders without ``generation_config.json`` are not dataset folders of this package: ``None``.
    """
    root = Path(root)
    if not (root / MANIFEST_FILENAME).is_file():
        return None
    tasks = read_manifest(root).get("tasks")
    complete = complete_tasks(root)
    missing = [t for t in tasks if t not in complete] if tasks else []
    unfinished = [name for name in ("README.md", "stats.json") if not (root / name).is_file()]
    if not missing and not unfinished and complete:
        return None
    parts = []
    if tasks:
        parts.append(f"{len(complete)} of {len(tasks)} tasks complete")
    if unfinished:
        parts.append(f"no {' or '.join(unfinished)} yet")
    return (
        f"{root} is a partly written dataset folder ({', '.join(parts)}): its generation was stopped before it "
        f"finished. Resume it with: {resume_command(root)}"
    )
