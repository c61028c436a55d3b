"""The episode format: one row per episode, its ``datasets`` features and a check of a dataset's columns.

Columns (``EPISODE_FEATURES``): ``observations`` (T×39 float32), ``actions`` (T×4 float32),
``rewards``/``terminations``/``truncations``/``success`` (length T), ``task_name``, ``task_id`` (index in the
canonical MT50 order), ``episode_index``, ``noise_level`` (NaN where unknown) and ``goal_index`` (-1 where unknown).
"""

from __future__ import annotations

from typing import Any

from datasets import Features, List, Value

from harmodt_hf.tasks import ACTION_DIM, OBSERVATION_DIM

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
