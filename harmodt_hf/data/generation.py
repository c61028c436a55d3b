"""Meta-World offline datasets from the scripted experts: noise schedule, episode rollout, parallel shard generation.

Quality mimics the official SAC replay buffers, which run from random to expert: episode ``e`` of ``N`` (per task) is
played with ε-random noise — with probability ``p`` a uniformly random action in [-1, 1]⁴, otherwise the expert's
action plus Gaussian noise of std ``gaussian_scale · p`` — where ``p`` falls from 1 with ``u = e / (N - 1)`` along
``NoiseSchedule.knots`` (30 % of the episodes lie in the 0.80–0.95 band where the experts' success collapses; the last
20 % are the bare expert). Sub-optimal = the first half, near-optimal = all episodes, as in the official data.

Every episode is a pure function of (seed, task, episode index, N, benchmark seed): its RNG is
``SeedSequence(seed, spawn_key=(task_id, episode_index))``, drawn in this order: the goal index (uniform over the 50
goals of ``MT1(task, seed=benchmark_seed)``), then the per-step ε draws, random actions and Gaussian noise. So the rows
do not depend on the number of workers or on which run (first or resumed) produced them.
"""

from __future__ import annotations

import functools
import math
import multiprocessing as mp
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from harmodt_hf.data.folder import (
    episodes_to_table,
    prepare_output,
    remove_stale_temporaries,
    shard_is_complete,
    shard_path,
    split_halves,
    write_parquet_atomic,
)
from harmodt_hf.envs import goals, make_env
from harmodt_hf.tasks import EPISODE_LENGTH, MT50, OBSERVATION_DIM, resolve_tasks

FORMAT_VERSION = 1
DEFAULT_KNOTS: tuple[tuple[float, float], ...] = (
    (0.0, 1.0),
    (0.05, 0.95),
    (0.35, 0.80),
    (0.5, 0.50),
    (0.7, 0.10),
    (0.8, 0.0),
    (1.0, 0.0),
)


@dataclass(frozen=True)
class NoiseSchedule:
    """ε-random noise level ``p`` as a piecewise-linear function of ``u = e / (N - 1)``, plus Gaussian noise."""

    knots: tuple[tuple[float, float], ...] = DEFAULT_KNOTS
    gaussian_scale: float = 0.3  # Gaussian action-noise std = gaussian_scale * p (none when p = 0)

    def __post_init__(self) -> None:
        us = [u for u, _ in self.knots]
        if len(us) < 2 or us[0] != 0.0 or us[-1] != 1.0 or any(b <= a for a, b in zip(us, us[1:], strict=False)):
            raise ValueError(f"Noise knots must have increasing u from 0.0 to 1.0, got {self.knots}")
        if any(not 0.0 <= p <= 1.0 for _, p in self.knots):
            raise ValueError(f"Noise levels p must lie in [0, 1], got {self.knots}")
        if self.gaussian_scale < 0:
            raise ValueError(f"gaussian_scale must be >= 0, got {self.gaussian_scale}")

    def level(self, episode_index: int, num_episodes: int) -> float:
        """The ε-random probability ``p`` of episode ``episode_index`` out of ``num_episodes``."""
        u = episode_index / (num_episodes - 1)
        return float(np.interp(u, [k[0] for k in self.knots], [k[1] for k in self.knots]))

    def to_dict(self) -> dict:
        return {"knots": [list(k) for k in self.knots], "gaussian_scale": self.gaussian_scale}


def episode_rng(seed: int, task: str, episode_index: int) -> np.random.Generator:
    """The RNG of one episode, derived from (seed, canonical task id, episode index) only."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(MT50.index(task), episode_index)))


def expert_policy(task: str):
    """A fresh scripted expert ``metaworld.policies.ENV_POLICY_MAP[task]()``."""
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[task]()


def rollout(env, policy, rng: np.random.Generator, noise_level: float, gaussian_scale: float) -> dict[str, np.ndarray]:
    """Play one episode (until the env ends it) with the noisy expert; return the step arrays.

    Actions are clipped to [-1, 1] before stepping, so the stored action is the one executed.
    """
    obs, _ = env.reset()
    T = EPISODE_LENGTH
    observations = np.empty((T, OBSERVATION_DIM), np.float32)
    actions = np.empty((T, 4), np.float32)
    rewards = np.empty(T, np.float32)
    terminations, truncations, success = np.zeros(T, bool), np.zeros(T, bool), np.zeros(T, bool)
    if noise_level > 0:
        explore = rng.random(T) < noise_level
        random_actions = rng.uniform(-1.0, 1.0, (T, 4))
        gaussian = rng.standard_normal((T, 4)) * (gaussian_scale * noise_level)
    t = 0
    for t in range(T):
        observations[t] = obs
        if noise_level > 0 and explore[t]:
            action = random_actions[t]
        elif noise_level > 0:
            action = policy.get_action(obs) + gaussian[t]
        else:
            action = policy.get_action(obs)
        actions[t] = np.clip(action, -1.0, 1.0)
        obs, reward, terminated, truncated, info = env.step(actions[t])
        rewards[t], terminations[t], truncations[t] = reward, terminated, truncated
        success[t] = bool(info.get("success", 0.0))
        if terminated or truncated:
            break
    n = t + 1
    if not (terminations[n - 1] or truncations[n - 1]):
        truncations[n - 1] = True
    return dict(
        observations=observations[:n],
        actions=actions[:n],
        rewards=rewards[:n],
        terminations=terminations[:n],
        truncations=truncations[:n],
        success=success[:n],
    )


@functools.cache
def generation_env(task: str, benchmark_seed: int) -> tuple[object, list]:
    """This process's environment for ``task`` and the goal list of ``MT1(task, benchmark_seed)`` (built once)."""
    return make_env(task, 0, benchmark_seed), goals(task, benchmark_seed)


def forget_environments() -> None:
    """Drop the environments this process keeps for generation (one per task)."""
    generation_env.cache_clear()


def generate_episode(
    task: str,
    episode_index: int,
    num_episodes: int,
    seed: int = 0,
    schedule: NoiseSchedule | None = None,
    benchmark_seed: int = 0,
) -> dict:
    """Episode ``episode_index`` of ``num_episodes`` for ``task``: one dataset row (see ``data.EPISODE_FEATURES``)."""
    schedule = schedule or NoiseSchedule()
    env, task_goals = generation_env(task, benchmark_seed)
    rng = episode_rng(seed, task, episode_index)
    goal_index = int(rng.integers(len(task_goals)))
    env.set_task(task_goals[goal_index])
    noise = schedule.level(episode_index, num_episodes)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Constant")  # the experts' "may be too high" notice
        steps = rollout(env, expert_policy(task), rng, noise, schedule.gaussian_scale)
    return dict(
        steps,
        task_name=task,
        task_id=MT50.index(task),
        episode_index=episode_index,
        noise_level=noise,
        goal_index=goal_index,
    )


def _run_chunk(job: tuple) -> list[dict]:
    task, indices, num_episodes, seed, schedule, benchmark_seed = job
    return [generate_episode(task, e, num_episodes, seed, schedule, benchmark_seed) for e in indices]


def generation_manifest(episodes_per_task: int, seed: int, schedule: NoiseSchedule, benchmark_seed: int) -> dict:
    """The settings that decide every row; a resumed run must match them exactly."""
    from importlib.metadata import version

    return {
        "format_version": FORMAT_VERSION,
        "source": "metaworld-scripted-experts",
        "episodes_per_task": episodes_per_task,
        "episode_length": EPISODE_LENGTH,
        "seed": seed,
        "benchmark_seed": benchmark_seed,
        "noise_schedule": schedule.to_dict(),
        "sub_optimal_rule": "first half: episodes [0, N // 2)",
        "metaworld_version": version("metaworld"),
        "mujoco_version": version("mujoco"),
    }


@dataclass
class GenerationResult:
    """What one ``generate_dataset`` call did."""

    output_dir: Path
    tasks: list[str]
    shards_written: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    episodes_generated: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    def write_shard(self, task: str, half: str, episodes: list[dict]) -> None:
        path = shard_path(self.output_dir, task, half)
        write_parquet_atomic(episodes_to_table(episodes), path)
        self.shards_written.append(str(path.relative_to(self.output_dir)))
        self.episodes_generated += len(episodes)


def start_output(
    root: Path, manifest: dict, overwrite: bool, halves: dict[str, dict[str, range]]
) -> tuple[GenerationResult, list[tuple[str, str, range]]]:
    """Prepare ``root`` for ``manifest`` (see ``prepare_output``) and list the shards of ``halves`` (task -> half ->
    episode indices) still to write, in writing order; complete shards are recorded as skipped."""
    prepare_output(root, manifest, overwrite)
    result = GenerationResult(output_dir=root, tasks=list(halves))
    remove_stale_temporaries(root, list(halves))
    pending = []
    for task, task_halves in halves.items():
        for half, indices in task_halves.items():
            path = shard_path(root, task, half)
            if shard_is_complete(path, len(indices)):
                result.shards_skipped.append(str(path.relative_to(root)))
            else:
                pending.append((task, half, indices))
    return result, pending


def _jobs(pending: list[tuple[str, str, range]], n: int, seed: int, schedule, bseed: int, chunk: int) -> list:
    """Work units (task, episode indices, …) of at most ``chunk`` episodes, in shard-writing order."""
    jobs = []
    for task, _, indices in pending:
        for start in range(0, len(indices), chunk):
            jobs.append((task, indices[start : start + chunk], n, seed, schedule, bseed))
    return jobs


@contextmanager
def _chunk_results(jobs: list, num_workers: int) -> Iterator[Iterator[list[dict]]]:
    """Chunk results in job order, from this process or from a pool of ``num_workers`` processes (stopped on exit)."""
    if num_workers <= 1 or len(jobs) <= 1:
        yield map(_run_chunk, jobs)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"  # fork: no re-import of torch per worker
    with mp.get_context(method).Pool(min(num_workers, len(jobs))) as pool:
        yield pool.imap(_run_chunk, jobs, chunksize=1)


def generate_dataset(
    output_dir: str | Path,
    tasks: str | Sequence[str],
    episodes_per_task: int,
    *,
    seed: int = 0,
    num_workers: int = 1,
    shard_index: int = 0,
    num_shards: int = 1,
    overwrite: bool = False,
    benchmark_seed: int = 0,
    schedule: NoiseSchedule | None = None,
    chunk_size: int = 10,
    progress: bool = True,
) -> GenerationResult:
    """Generate (or resume) a dataset folder: ``episodes_per_task`` episodes for each task of this shard.

    Tasks are split round-robin over ``num_shards`` (machines); episodes over ``num_workers`` processes. Complete
    shards are skipped, so a killed run resumes where it stopped. The folder's ``stats.json``,
    ``README.md`` (configs + card) and histogram are rewritten from all complete tasks present.
    """
    task_list = sorted(resolve_tasks(tasks), key=MT50.index)  # canonical order
    if not isinstance(episodes_per_task, int) or episodes_per_task < 2:
        raise ValueError(f"episodes_per_task must be an integer >= 2 (one per half), got {episodes_per_task!r}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, num_shards={num_shards}), got {shard_index}")
    if num_workers < 1 or chunk_size < 1:
        raise ValueError(f"num_workers and chunk_size must be >= 1, got {num_workers} and {chunk_size}")
    schedule = schedule or NoiseSchedule()
    start = time.perf_counter()
    root = Path(output_dir)
    manifest = generation_manifest(episodes_per_task, seed, schedule, benchmark_seed)
    manifest["tasks"] = task_list  # for the resume command of a killed run
    halves = split_halves(episodes_per_task)
    result, pending = start_output(
        root, manifest, overwrite, {task: halves for task in task_list[shard_index::num_shards]}
    )

    chunk = max(1, min(chunk_size, math.ceil(max((len(r) for r in halves.values()), default=1) / num_workers)))
    jobs = _jobs(pending, episodes_per_task, seed, schedule, benchmark_seed, chunk)
    from tqdm.auto import tqdm

    total = sum(len(r) for _, _, r in pending)
    buffer: list[dict] = []
    shard_iter = iter(pending)
    current = next(shard_iter, None)
    desc = f"shard {shard_index + 1}/{num_shards}"
    bar_args = dict(total=total, unit="episode", desc=desc, disable=not progress)
    # the pool forks its workers before tqdm starts its monitor thread
    with _chunk_results(jobs, num_workers) as results, tqdm(**bar_args) as bar:
        for episodes in results:
            buffer.extend(episodes)
            bar.update(len(episodes))
            while current is not None and len(buffer) >= len(current[2]):
                task, half, indices = current
                result.write_shard(task, half, buffer[: len(indices)])
                buffer = buffer[len(indices) :]
                current = next(shard_iter, None)
    from harmodt_hf.data.card import finalize_dataset

    finalize_dataset(root)
    result.seconds = time.perf_counter() - start
    return result
