"""Describe a dataset folder: ``stats.json``, the README (YAML ``configs:`` + card) and a return histogram.

Everything here is recomputed from the parquet shards present, so running it again after more tasks arrive (another
machine's shards copied in, a resumed run) gives the description of the whole folder.
"""

from __future__ import annotations

import io
import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

from harmodt_hf.data.folder import (
    HALVES,
    complete_tasks,
    read_manifest,
    shard_path,
    shard_relpath,
    write_bytes_atomic,
)
from harmodt_hf.data.schema import QUALITIES, STATS_FILENAME
from harmodt_hf.data.validation import (
    CHECKED_COLUMNS,
    EpisodeDataError,
    check_episode_batches,
    check_schema,
    open_shard,
)
from harmodt_hf.tasks import MT50, OBSERVATION_DIM, TASK_SETS, tasks_argument

TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "hub" / "templates" / "dataset_card.md.j2"
HISTOGRAM_PATH = "images/returns_histogram.png"
QUALITY_HALVES = {"near-optimal": HALVES, "sub-optimal": HALVES[:1]}


def _read_half(path: Path) -> dict:
    """Per-shard sufficient statistics: step count, state mean and M2 (float64), per-episode returns/success/noise.

    The shard is checked as it is read (schema, episode lengths, finite values): :class:`EpisodeDataError` names it.
    """
    shard = open_shard(path)
    check_schema(shard.schema_arrow, str(path))
    try:
        table = shard.read(columns=[*CHECKED_COLUMNS, "noise_level"])
    except (pa.ArrowInvalid, OSError) as error:
        raise EpisodeDataError(f"{path} cannot be read to its end ({error}); it may be truncated.") from error
    if not check_episode_batches(table.to_batches(), str(path), schema_checked=True):
        raise EpisodeDataError(f"{path} holds no episode.")
    obs = table.column("observations").combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
    obs = obs.reshape(-1, OBSERVATION_DIM)
    mean = obs.mean(axis=0, dtype=np.float64)
    m2 = np.square(obs - mean, dtype=np.float64).sum(axis=0)
    rewards, success = (table.column(c).combine_chunks() for c in ("rewards", "success"))
    starts = rewards.offsets.to_numpy()[:-1]  # absolute offsets into .values; every episode has >= 1 step
    return {
        "steps": len(obs),
        "mean": mean,
        "m2": m2,
        "returns": np.add.reduceat(rewards.values.to_numpy().astype(np.float64), starts),
        "success": np.logical_or.reduceat(success.values.to_numpy(zero_copy_only=False), starts),
        "noise": table.column("noise_level").to_numpy(zero_copy_only=False).astype(np.float64),
    }


def _combine(parts: list[dict]) -> dict:
    """Merge shard statistics (Chan et al. parallel mean/variance)."""
    steps, mean, m2 = 0, np.zeros(OBSERVATION_DIM), np.zeros(OBSERVATION_DIM)
    for p in parts:
        n = steps + p["steps"]
        delta = p["mean"] - mean
        mean = mean + delta * (p["steps"] / n)
        m2 = m2 + p["m2"] + delta**2 * (steps * p["steps"] / n)
        steps = n
    out = {key: np.concatenate([p[key] for p in parts]) for key in ("returns", "success", "noise")}
    return dict(out, steps=steps, mean=mean, std=np.sqrt(m2 / steps))


def _summary(agg: dict, success_known: bool) -> dict:
    returns = agg["returns"]
    return {
        "num_episodes": len(returns),
        "num_steps": int(agg["steps"]),
        "state_mean": agg["mean"].astype(np.float32).tolist(),
        "state_std": agg["std"].astype(np.float32).tolist(),  # raw std: add 1e-6 at use
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "return_min": float(returns.min()),
        "return_max": float(returns.max()),
        "success_rate": float(agg["success"].mean()) if success_known else None,
    }


def compute_stats(root: str | Path, tasks: list[str] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """``stats.json`` content for the complete tasks of ``root``, and all episode returns per quality (for plots)."""
    root = Path(root)
    manifest = read_manifest(root)
    tasks = complete_tasks(root) if tasks is None else tasks
    success_known = manifest.get("success_in_source", True)
    stats: dict = {"format_version": 1, "generation": manifest, "tasks": {}}
    returns: dict[str, list] = {q: [] for q in QUALITIES}
    for task in tasks:
        halves = {h: _read_half(shard_path(root, task, h)) for h in HALVES}
        entry: dict = {"task_id": MT50.index(task)}
        for quality, names in QUALITY_HALVES.items():
            agg = _combine([halves[h] for h in names])
            entry[quality] = _summary(agg, success_known)
            returns[quality].append(agg["returns"])
        both = _combine([halves[h] for h in HALVES])
        expert = both["noise"] == 0.0
        entry["expert"] = {
            "num_episodes": int(expert.sum()),
            "success_rate": float(both["success"][expert].mean()) if expert.any() and success_known else None,
            "return_mean": float(both["returns"][expert].mean()) if expert.any() else None,
        }
        stats["tasks"][task] = entry
    return stats, {q: np.concatenate(r) if r else np.zeros(0) for q, r in returns.items()}


def _config_groups(tasks: list[str]) -> list[tuple[str, list[str]]]:
    """(prefix, member tasks): every task set fully present, ``all``, then each task."""
    present = set(tasks)
    groups = [(key, list(members)) for key, members in TASK_SETS.items() if present.issuperset(members)]
    return groups + [("all", list(tasks))] + [(t, [t]) for t in tasks]


def dataset_configs(tasks: list[str]) -> list[dict]:
    """README ``configs:``: each full task set, ``all-*``, and one pair per task (sub-optimal = first halves)."""
    configs = []
    for name, members in _config_groups(tasks):
        for quality in QUALITIES:
            files = [shard_relpath(t, h) for t in members for h in QUALITY_HALVES[quality]]
            entry = {"config_name": f"{name}-{quality}"}
            if name == "all" and quality == "near-optimal":
                entry["default"] = True
            configs.append(dict(entry, data_files=[{"split": "train", "path": files}]))
    return configs


def plot_return_histogram(returns: dict[str, np.ndarray]) -> bytes:
    """PNG bytes: histogram of episode returns, one series per quality (near-optimal includes sub-optimal)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    everything = np.concatenate([r for r in returns.values() if len(r)])
    bins = np.linspace(everything.min(), everything.max() + 1e-6, 41)
    for quality, color in zip(QUALITIES, ("tab:blue", "tab:orange"), strict=False):
        ax.hist(returns[quality], bins=bins, alpha=0.6, color=color, label=f"{quality} ({len(returns[quality])} ep.)")
    ax.set_xlabel("episode return (sum of rewards over the episode)")
    ax.set_ylabel("number of episodes")
    ax.set_title("Episode returns by dataset quality (all tasks)")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _versions() -> dict[str, str]:
    from harmodt_hf import __version__

    out = {"python": platform.python_version(), "harmodt-hf": __version__}
    for name in ("metaworld", "mujoco", "gymnasium", "numpy", "datasets", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def render_card(stats: dict) -> str:
    """The README body (Markdown) from the Jinja template."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    tasks = stats["tasks"]
    rows = []
    for name, members in _config_groups(list(tasks)):
        label = name.upper() if name in TASK_SETS else ("all tasks here" if name == "all" else name)
        for quality in QUALITIES:
            episodes = sum(tasks[t][quality]["num_episodes"] for t in members)
            rows.append({"name": f"{name}-{quality}", "tasks": label, "episodes": episodes})
    return env.from_string(TEMPLATE_PATH.read_text(encoding="utf-8")).render(
        stats=stats,
        generation=stats["generation"],
        tasks=tasks,
        config_rows=rows,
        task_sets=[k.upper() for k, _ in _config_groups(list(tasks)) if k in TASK_SETS],
        tasks_arg=tasks_argument(list(tasks)),
        versions=_versions(),
        histogram_path=HISTOGRAM_PATH,
    )


def _non_finite(value, path: str) -> list[str]:
    """Paths (``tasks.reach-v3.near-optimal.state_std``) of the non-finite numbers inside ``value``."""
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _non_finite(item, f"{path}.{key}" if path else str(key))]
    if isinstance(value, (list, tuple)):
        return [path] if any(_non_finite(item, path) for item in value) else []
    if isinstance(value, float) and not np.isfinite(value):
        return [path]
    return []


def check_finite_stats(stats: dict) -> None:
    """Raise :class:`EpisodeDataError` naming every non-finite statistic, so none is ever written to ``stats.json``.

    ``generation`` (the settings, where a NaN noise level means "unknown") is not checked.
    """
    bad = _non_finite(stats.get("tasks", {}), "tasks")
    if bad:
        raise EpisodeDataError(
            f"The dataset statistics hold non-finite values ({', '.join(bad[:5])}); stats.json was not written. "
            "Check the shards of these tasks."
        )


def finalize_dataset(root: str | Path) -> dict | None:
    """Write ``stats.json``, ``images/returns_histogram.png`` and ``README.md`` for the complete tasks of ``root``.

    Returns the stats, or ``None`` (writing nothing) when no task is complete yet.
    """
    root = Path(root)
    tasks = complete_tasks(root)
    if not tasks:
        return None
    stats, returns = compute_stats(root, tasks)
    check_finite_stats(stats)
    configs = dataset_configs(tasks)
    write_bytes_atomic(json.dumps(stats, indent=1).encode(), root / STATS_FILENAME)
    write_bytes_atomic(plot_return_histogram(returns), root / HISTOGRAM_PATH)
    source = stats["generation"].get("source", "")
    meta = {
        "license": "mit" if source == "metaworld-scripted-experts" else "other",
        "pretty_name": "Meta-World offline episodes (harmodt-hf)",
        "task_categories": ["reinforcement-learning"],
        "tags": ["metaworld", "offline-rl", "multi-task", "decision-transformer", "harmodt"],
        "configs": configs,
    }
    header = yaml.safe_dump(meta, sort_keys=False, default_flow_style=False)
    write_bytes_atomic(f"---\n{header}---\n{render_card(stats)}".encode(), root / "README.md")
    return stats
