"""Evaluating: batched Meta-World rollouts (:func:`evaluate`) and the success plot (:func:`plot_success`).

Protocol of :func:`evaluate` (the official one): episode ``e`` of a task uses goal ``e`` of ``MT1(task, seed)``,
lasts at most 500 steps, and succeeds when ``info['success']`` is set at any step; the return-to-go starts at the
model config's target return for the task and is decremented by every reward. All running episodes of all tasks are
advanced together with one policy call per step, while the environments step in worker processes.
The policy lives in :mod:`.policy` and the environments in :mod:`.workers` (their public names are re-exported here).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from harmodt_hf.evaluation.policy import PRECISIONS, STD_EPSILON, HarmoDTPolicy, check_precision
from harmodt_hf.evaluation.workers import (
    EnvFactory,
    EpisodeSpec,
    LocalEnvs,
    WorkerEnvs,
    check_mp4_support,
    default_env_factory,
    episode_reset_seed,
    write_video,
)
from harmodt_hf.tasks import ACTION_DIM, EPISODE_LENGTH, OBSERVATION_DIM, resolve_tasks

GOALS_PER_TASK = 50  # len(MT1(task).train_tasks)


# ================================================================================================ evaluate
def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return int(value)


def _video_flags(video_episodes: int | Sequence[int], episodes_per_task: int) -> set[int]:
    if isinstance(video_episodes, (int, np.integer)):
        return set(range(min(int(video_episodes), episodes_per_task)))
    chosen = {int(e) for e in video_episodes}
    if any(not 0 <= e < episodes_per_task for e in chosen):
        raise ValueError(f"video_episodes must be episode numbers in [0, {episodes_per_task}), got {sorted(chosen)}")
    return chosen


@dataclass
class _Rollout:
    """Per-episode outcomes of :func:`_rollout`, indexed by ``EpisodeSpec.index``."""

    returns: np.ndarray
    lengths: np.ndarray
    successes: np.ndarray
    actions: list[list[list[float]]]
    videos: dict[int, str]
    env_setup_s: float = 0.0  # building and resetting the environments (waiting for the workers to do it)
    policy_s: float = 0.0  # in policy.act (its result is on the CPU when it returns: device work included)
    env_wait_s: float = 0.0  # waiting for env steps after the policy had acted (what pipelining did not hide)


class _Wave:
    """Episodes whose environments step together (one set of workers) while the policy may act for another wave."""

    def __init__(self, episodes: list[int]) -> None:
        self.active = episodes
        self.ended: list[int] = []  # ended at the last step; their environments are closed with the next request
        self.steps = 0
        self.ticket: Any = None  # the step sent to the workers and not yet received


def _rollout(
    policy: HarmoDTPolicy,
    envs: LocalEnvs | WorkerEnvs,
    num_episodes: int,
    max_steps: int,
    stop_on_success: bool,
    record_actions: bool,
    progress: bool,
    waves: int = 1,
) -> _Rollout:
    """Run every episode to its end: per wave, one policy call for its running episodes, then one parallel env step.

    With several waves (``envs.waves``), the policy acts for one wave while the other waves' environments step.
    An episode's actions do not depend on which other episodes share its policy call, so the result is the same.
    """
    out = _Rollout(
        returns=np.zeros(num_episodes),
        lengths=np.zeros(num_episodes, dtype=np.int64),
        successes=np.zeros(num_episodes, dtype=bool),
        actions=[[] for _ in range(num_episodes)],
        videos={},
    )
    start = time.perf_counter()
    observations = envs.reset()
    out.env_setup_s = time.perf_counter() - start
    rewards = np.zeros(num_episodes)
    all_waves = [_Wave(episodes) for episodes in envs.waves(waves)]

    def act_and_send(wave: _Wave) -> None:
        obs = np.stack([observations[i] for i in wave.active])
        started = time.perf_counter()
        actions = policy.act(obs, rewards[wave.active] if wave.steps else None, active=wave.active)
        out.policy_s += time.perf_counter() - started
        successes = {i: bool(out.successes[i]) for i in wave.ended}
        wave.ticket = envs.send_step({i: actions[j] for j, i in enumerate(wave.active)}, wave.ended, successes)
        wave.ended = []
        if record_actions:
            for j, i in enumerate(wave.active):
                out.actions[i].append([float(a) for a in actions[j]])

    def receive(wave: _Wave) -> None:
        started = time.perf_counter()
        (results, videos), wave.ticket = envs.receive_step(wave.ticket), None
        out.videos.update(videos)
        out.env_wait_s += time.perf_counter() - started
        for i in wave.active:
            observations[i], rewards[i], success, done = results[i]
            out.returns[i] += rewards[i]
            out.lengths[i] += 1
            out.successes[i] |= success
            if done or (success and stop_on_success):
                wave.ended.append(i)
        ended = set(wave.ended)
        wave.active = [i for i in wave.active if i not in ended]
        wave.steps += 1

    with tqdm(total=max_steps, desc="evaluate", unit="step", disable=not progress) as bar:
        running = [wave for wave in all_waves if wave.active]
        for wave in running:
            act_and_send(wave)
        while running:
            for wave in running:
                receive(wave)
                if wave.active and wave.steps < max_steps:
                    act_and_send(wave)
            running = [wave for wave in running if wave.ticket is not None]
            if progress:
                running_episodes = sum(len(w.active) for w in running)
                bar.set_postfix(running=running_episodes, successes=int(out.successes.sum()), refresh=False)
                bar.update(max(w.steps for w in all_waves) - bar.n)
    finished = [i for wave in all_waves for i in wave.ended + wave.active]
    out.videos.update(envs.finish(finished, {i: bool(out.successes[i]) for i in finished}))
    return out


def evaluate(
    model: torch.nn.Module,
    tasks: str | Sequence[str] = "mt50",
    episodes_per_task: int = 10,
    seed: int = 0,
    stop_on_success: bool = True,
    num_workers: int | None = None,
    max_steps: int = EPISODE_LENGTH,
    video_episodes: int | Sequence[int] = 0,
    video_dir: str | Path | None = None,
    video_format: str = "mp4",
    record_actions: bool = False,
    progress: bool = False,
    env_factory: EnvFactory | None = None,
    worker_timeout: float = 300.0,
    torch_threads: int | None = None,
    precision: str = "fp32",
    pipeline: bool | None = None,
) -> dict[str, Any]:
    """Roll out ``episodes_per_task`` episodes of every task with the model; return a JSON-serialisable dict.

    Episode ``e`` of a task uses goal ``e`` of ``MT1(task, seed=seed)`` and env reset seed
    ``episode_reset_seed(seed, task, e)``. All running episodes are advanced together (one policy call per step).

    Args:
        model: a :class:`~harmodt_hf.HarmoDTModel`; put in eval mode for the rollouts and restored afterwards.
        tasks: a task set (``mt5``/``mt10``/``mt30``/``mt50``), a comma-separated string or a list of task names;
            every task must be one of the model's ``config.task_names``.
        episodes_per_task: 1..50 (one goal per episode).
        seed: evaluation seed (goal list and env reset seeds).
        stop_on_success: end an episode at its first success (the success rate is unchanged; returns and lengths
            then count the steps up to the first success).
        num_workers: env worker processes; ``None`` uses one per CPU core (at most one per episode); 0 or 1 steps
            the envs in this process.
        max_steps: episode length limit (500 in the official protocol).
        video_episodes: episodes to render per task: a count (the first ``n``) or a list of episode numbers.
        video_dir: where videos go (``<task>_episode<e>_<success|failure>.<video_format>``); required for videos.
        video_format: ``"mp4"`` or ``"gif"``.
        record_actions: also return every episode's actions (``per_task[task]["actions"]``).
        progress: show a tqdm bar over environment steps.
        env_factory: ``(task, goal_index, seed) -> env`` replacing :func:`harmodt_hf.envs.make_env` (must be
            picklable when workers are used).
        worker_timeout: seconds to wait for a worker's reply before reporting it as stuck.
        torch_threads: torch CPU threads during the rollouts (restored afterwards); ``None`` leaves them as they are.
            With more than one thread the CPU matmul kernels can change the last bits of an action, which the
            simulator can amplify over an episode (measurements in benchmarks/RESULTS.md).
        precision: ``"fp32"`` (default, as the official evaluation) or ``"bf16"`` (the policy's forward under
            ``torch.autocast``, see :class:`HarmoDTPolicy`): actions then differ from fp32 ones in the third
            significant digit, which can change individual episodes. The results record the precision.
        pipeline: split the episodes into two waves owned by different env workers and let the policy act for one
            wave while the other's environments step (``None``: on when there are at least two workers). Every
            episode gets the same actions either way; it saves the time the policy would wait for the envs.

    Returns a dict: ``mean_success_rate``, ``per_task`` results, the protocol (tasks, seed, episodes, steps, target
    returns), the model, and the cost: ``env_steps``, ``wall_time_s``, of which ``env_setup_s`` building the
    environments, ``policy_s`` in the policy (device work included) and ``env_wait_s`` waiting for env steps that
    pipelining did not hide.
    """
    config = model.config
    task_names = resolve_tasks(tasks)
    task_ids = [config.task_id(name) for name in task_names]
    episodes_per_task = _check_int("episodes_per_task", episodes_per_task, 1, GOALS_PER_TASK)
    seed = _check_int("seed", seed, 0)
    max_steps = _check_int("max_steps", max_steps, 1, min(EPISODE_LENGTH, config.max_ep_len))
    if (config.state_dim, config.act_dim) != (OBSERVATION_DIM, ACTION_DIM):
        raise ValueError(
            f"Meta-World has {OBSERVATION_DIM}-dim observations and {ACTION_DIM}-dim actions; this model has "
            f"state_dim={config.state_dim}, act_dim={config.act_dim}"
        )
    if video_format not in ("mp4", "gif"):
        raise ValueError(f"video_format must be 'mp4' or 'gif', got {video_format!r}")
    if video_format == "mp4" and video_episodes:
        check_mp4_support()  # before any environment is built
    if torch_threads is not None:
        _check_int("torch_threads", torch_threads, 1)
    precision = check_precision(precision)
    with_video = _video_flags(video_episodes, episodes_per_task)
    if with_video and video_dir is None:
        raise ValueError("video_episodes needs video_dir")

    specs = [
        EpisodeSpec(
            index=t * episodes_per_task + e,
            task=name,
            task_id=task_id,
            episode=e,
            goal_index=e,
            reset_seed=episode_reset_seed(seed, name, e),
            video=e in with_video,
        )
        for t, (name, task_id) in enumerate(zip(task_names, task_ids, strict=True))
        for e in range(episodes_per_task)
    ]
    num_episodes = len(specs)
    workers = (os.cpu_count() or 1) if num_workers is None else _check_int("num_workers", num_workers, 0)
    workers = min(workers, num_episodes)
    env_kwargs = dict(
        env_factory=env_factory or default_env_factory,
        video_dir=str(video_dir) if video_dir is not None else None,
        video_format=video_format,
    )

    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    envs = None
    try:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        policy = HarmoDTPolicy(model, precision=precision)
        policy.reset([spec.task_id for spec in specs])  # fails early (e.g. no stored prompt) before any env starts
        start = time.perf_counter()
        if workers <= 1:
            envs = LocalEnvs(specs, seed, **env_kwargs)
        else:
            envs = WorkerEnvs(specs, seed, workers, worker_timeout, **env_kwargs)
        pipelined = workers > 1 and (pipeline is None or bool(pipeline))
        out = _rollout(
            policy, envs, num_episodes, max_steps, stop_on_success, record_actions, progress, 2 if pipelined else 1
        )
    finally:
        if envs is not None:
            envs.close()
        if hasattr(model, "cache_masked_weights"):
            model.cache_masked_weights(False)  # drop the masked weights the policy built (once per task)
        model.train(was_training)
        torch.set_num_threads(threads)
    wall_time = time.perf_counter() - start
    returns, lengths, successes, videos = out.returns, out.lengths, out.successes, out.videos

    per_task = {}
    for t, name in enumerate(task_names):
        rows = range(t * episodes_per_task, (t + 1) * episodes_per_task)
        entry = {
            "success_rate": float(successes[rows].mean()),
            "mean_return": float(returns[rows].mean()),
            "mean_episode_length": float(lengths[rows].mean()),
            "episodes": episodes_per_task,
            "successes": [bool(successes[i]) for i in rows],
            "returns": [float(returns[i]) for i in rows],
            "episode_lengths": [int(lengths[i]) for i in rows],
            "goal_indices": [specs[i].goal_index for i in rows],
            "reset_seeds": [specs[i].reset_seed for i in rows],
            "target_return": float(config.target_returns[task_ids[t]]),
        }
        if record_actions:
            entry["actions"] = [out.actions[i] for i in rows]
        task_videos = {str(specs[i].episode): videos[i] for i in rows if i in videos}
        if task_videos:
            entry["videos"] = task_videos
        per_task[name] = entry
    return {
        "mean_success_rate": float(np.mean([entry["success_rate"] for entry in per_task.values()])),
        "per_task": per_task,
        "tasks": task_names,
        "seed": seed,
        "episodes_per_task": episodes_per_task,
        "max_steps": max_steps,
        "stop_on_success": bool(stop_on_success),
        "target_returns": {name: float(config.target_returns[i]) for name, i in zip(task_names, task_ids, strict=True)},
        "return_scale": float(config.return_scale),
        "model": {
            "name_or_path": getattr(config, "_name_or_path", "") or None,
            "commit_hash": getattr(config, "_commit_hash", None),
            "mask_mode": config.mask_mode,
            "use_prompt": bool(config.use_prompt),
        },
        "env_steps": int(lengths.sum()),
        "wall_time_s": wall_time,
        "env_setup_s": out.env_setup_s,
        "policy_s": out.policy_s,
        "env_wait_s": out.env_wait_s,
        "num_workers": workers if workers > 1 else 0,
        "torch_threads": torch_threads or threads,
        "precision": precision,
        "pipeline": pipelined,
    }


# ================================================================================================ plots
def plot_success(results: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of per-task success rate (%) with the mean as a dashed line, saved as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(results["per_task"])
    rates = [100.0 * results["per_task"][name]["success_rate"] for name in names]
    mean = 100.0 * results["mean_success_rate"]
    fig = Figure(figsize=(8, max(2.5, 0.28 * len(names) + 1.2)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positions = np.arange(len(names))
    ax.barh(positions, rates, color="tab:blue")
    ax.axvline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.1f} %")
    ax.set_yticks(positions, [name.removesuffix("-v3") for name in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("success rate (%)")
    ax.set_ylabel("task")
    episodes, precision = results.get("episodes_per_task"), results.get("precision", "fp32")
    note = "" if precision == "fp32" else f", {precision} policy"
    ax.set_title(f"Success per task ({episodes} episodes each, seed {results.get('seed')}{note})")
    ax.legend(loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


__all__ = [
    "GOALS_PER_TASK",
    "PRECISIONS",
    "STD_EPSILON",
    "EnvFactory",
    "EpisodeSpec",
    "HarmoDTPolicy",
    "episode_reset_seed",
    "evaluate",
    "plot_success",
    "write_video",
]
