"""The episode format: one row per episode and its ``datasets`` features.

Columns (``EPISODE_FEATURES``): ``observations`` (T×39 float32), ``actions`` (T×4 float32),
``rewards``/``terminations``/``truncations``/``success`` (length T), ``task_name``, ``task_id`` (index in the
canonical MT50 order), ``episode_index``, ``noise_level`` (NaN where unknown) and ``goal_index`` (-1 where unknown).
"""

from __future__ import annotations

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
