"""Checks of episode data as it is read: each shard's schema, episode lengths >= 1, finite values, naming the file.

A shard that fails is reported as :class:`EpisodeDataError` (a ``ValueError``) naming the file, the rows and what is
wrong, instead of a numpy or pyarrow error raised later from deep inside the statistics, the loader or the trainer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Dataset, Features

from harmodt_hf.data.schema import EPISODE_FEATURES, describe_episode_format

STEP_COLUMNS: tuple[str, ...] = ("observations", "actions", "rewards", "terminations", "truncations", "success")
FINITE_COLUMNS: tuple[str, ...] = ("observations", "actions", "rewards")
CHECKED_COLUMNS: tuple[str, ...] = (*STEP_COLUMNS, "task_name", "task_id", "episode_index")  # what the checks read
_SHOWN_ROWS = 5

__all__ = [
    "CHECKED_COLUMNS",
    "FINITE_COLUMNS",
    "STEP_COLUMNS",
    "EpisodeDataError",
    "check_episode_batches",
    "check_episode_schema",
    "check_schema",
    "check_shard",
    "open_shard",
]


class EpisodeDataError(ValueError):
    """Episode data that cannot be used: a missing or mistyped column, an empty episode, a non-finite value."""


def _same_type(found: pa.DataType, expected: pa.DataType) -> bool:
    """Arrow types equal up to the names of list items (``item`` / ``element``)."""
    if pa.types.is_fixed_size_list(expected):
        return (
            pa.types.is_fixed_size_list(found)
            and found.list_size == expected.list_size
            and _same_type(found.value_type, expected.value_type)
        )
    if pa.types.is_list(expected) or pa.types.is_large_list(expected):
        return (pa.types.is_list(found) or pa.types.is_large_list(found)) and _same_type(
            found.value_type, expected.value_type
        )
    return found.equals(expected)


def check_schema(schema: pa.Schema, where: str) -> None:
    """Every column of the episode format is present with its type (extra columns are allowed); otherwise an
    :class:`EpisodeDataError` starting with ``where`` names every missing or mistyped column."""
    expected = EPISODE_FEATURES.arrow_schema
    problems = []
    for field in expected:
        index = schema.get_field_index(field.name)
        if index < 0:
            problems.append(f"missing column {field.name!r}")
        elif not _same_type(schema.field(index).type, field.type):
            problems.append(f"column {field.name!r} has type {schema.field(index).type}, expected {field.type}")
    if problems:
        raise EpisodeDataError(
            f"{where}: {'; '.join(problems)}. Meta-World episode data holds one episode per row with columns:\n"
            f"{describe_episode_format()}\nGenerate data with harmodt-generate-data or convert the official data with "
            "harmodt-convert-official."
        )


def check_episode_schema(ds: Dataset | Features) -> None:
    """:func:`check_schema` of a ``datasets.Dataset`` or its ``Features``."""
    features = ds if isinstance(ds, Features) else ds.features
    check_schema(features.arrow_schema, "Not a Meta-World episode dataset")


def _rows(rows: np.ndarray, first_row: int, batch: pa.RecordBatch) -> str:
    """``rows 3, 7 (reach-v3 episode 53, ...)`` for the first few bad rows of a batch."""
    shown = rows[:_SHOWN_ROWS]
    names, episodes = batch.column("task_name"), batch.column("episode_index")
    labels = [f"{first_row + int(r)} ({names[int(r)].as_py()} episode {episodes[int(r)].as_py()})" for r in shown]
    more = f" and {len(rows) - len(shown)} more" if len(rows) > len(shown) else ""
    return f"row{'s' if len(rows) > 1 else ''} " + ", ".join(labels) + more


def _check_batch(batch: pa.RecordBatch, first_row: int, where: str) -> None:
    for name in CHECKED_COLUMNS:
        if batch.column(name).null_count:
            raise EpisodeDataError(f"{where}: column {name!r} has missing values (null episodes).")
    lengths = pc.list_value_length(batch.column("rewards")).to_numpy(zero_copy_only=False)
    empty = np.flatnonzero(lengths < 1)
    if empty.size:
        raise EpisodeDataError(
            f"{where}: {_rows(empty, first_row, batch)} ha{'ve' if empty.size > 1 else 's'} no step; every episode "
            "needs at least one step."
        )
    for name in STEP_COLUMNS:
        other = pc.list_value_length(batch.column(name)).to_numpy(zero_copy_only=False)
        differ = np.flatnonzero(other != lengths)
        if differ.size:
            raise EpisodeDataError(
                f"{where}: {_rows(differ, first_row, batch)}: column {name!r} has another number of steps than "
                "'rewards'."
            )
    step_rows = np.repeat(np.arange(len(lengths)), lengths)
    for name in FINITE_COLUMNS:
        values = batch.column(name).flatten()
        if pa.types.is_fixed_size_list(values.type):
            values = values.flatten()
        steps = values.to_numpy(zero_copy_only=False).reshape(len(step_rows), -1)
        bad_steps = ~np.isfinite(steps).all(axis=1)
        if bad_steps.any():
            bad = np.unique(step_rows[bad_steps])
            rows = _rows(bad, first_row, batch)
            raise EpisodeDataError(f"{where}: {rows}: non-finite values (NaN or inf) in {name!r}.")


def check_episode_batches(batches: Iterable[pa.RecordBatch], where: str, schema_checked: bool = False) -> int:
    """Check record batches of episodes (schema, lengths >= 1 and equal across step columns, finite values).

    ``schema_checked``: the batches' source was checked with :func:`check_schema` (they may hold only the columns
    these checks read). Returns the number of episodes; raises :class:`EpisodeDataError` starting with ``where``.
    """
    rows = 0
    for batch in batches:
        if rows == 0 and not schema_checked:
            check_schema(batch.schema, where)
        _check_batch(batch, rows, where)
        rows += batch.num_rows
    return rows


def open_shard(path: str | os.PathLike) -> pq.ParquetFile:
    """The parquet file at ``path``; :class:`EpisodeDataError` naming it when it is truncated or not parquet."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise EpisodeDataError(
            f"{path} is not a readable parquet file ({error}); it may be truncated (an interrupted copy). Delete it "
            "and run the command that wrote it again: a resumed generation or conversion rewrites missing shards."
        ) from error


def check_shard(path: str | os.PathLike) -> int:
    """Check one parquet shard of episodes; returns its number of episodes (see :func:`check_episode_batches`)."""
    path = Path(path)
    shard = open_shard(path)
    check_schema(shard.schema_arrow, str(path))
    try:
        return check_episode_batches(shard.iter_batches(columns=list(CHECKED_COLUMNS)), str(path), schema_checked=True)
    except (pa.ArrowInvalid, OSError) as error:
        raise EpisodeDataError(f"{path} cannot be read to its end ({error}); it may be truncated.") from error
