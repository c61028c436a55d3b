"""A new task's prompt and observation statistics from a few demonstrations, by the training rule.

:meth:`HarmoDTModel.add_task <harmodt_hf.model.modeling_harmodt.HarmoDTModel.add_task>` needs a model-ready prompt and
the task's state mean and std. From a few episodes of the new task, :func:`demonstrations_from_episodes` (episode
arrays) and :func:`demonstrations_from_dataset` (a dataset folder or Hub repo and config) compute them as training
does for a trained task (:class:`~.segments.SegmentSampler`):

* statistics: the mean and std of the observations over every step of the demonstrations, except that each
  dimension's std is at least ``std_floor`` × the trained tasks' mean std of that dimension. A few demonstrations, or
  one, underestimate how much an observation varies across goals (one episode has one goal: its goal dimensions do not
  vary at all, and ``(obs - mean) / (0 + 1e-6)`` would turn the next goal into values of a million);
  ``std_floor=0`` keeps the demonstrations' std as they are;
* prompt: the evaluation prompt of the training rule, the ``prompt_length`` steps ending one step before the end of
  the highest-return demonstration (steps T−P−1 … T−2), states normalised with those statistics, returns-to-go
  divided by ``return_scale``.

The returned :class:`TaskDemonstrations` also holds the episodes, for few-shot adaptation
(:mod:`harmodt_hf.training.adaptation`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from harmodt_hf.model.configuration_harmodt import HarmoDTConfig
from harmodt_hf.model.new_tasks import trained_task_ids
from harmodt_hf.training.segments import EpisodeBuffer, SegmentSampler, TaskEpisodes

__all__ = [
    "TaskDemonstrations",
    "add_task_from_demonstrations",
    "demonstrations_from_dataset",
    "demonstrations_from_episodes",
]


@dataclass
class TaskDemonstrations:
    """What a new task's demonstrations give: its episodes, statistics and prompt (model-ready, ``None`` for a model
    without prompts). ``floored_dims``: the observation dimensions whose std was raised to the floor."""

    task_name: str
    episodes: TaskEpisodes
    state_mean: np.ndarray
    state_std: np.ndarray
    prompt: dict[str, np.ndarray] | None
    floored_dims: list[int]

    def add_task_kwargs(self) -> dict:
        """The keyword arguments of ``model.add_task(demos.task_name, **demos.add_task_kwargs())``."""
        return {"prompt": self.prompt, "state_mean": self.state_mean.tolist(), "state_std": self.state_std.tolist()}

    @property
    def num_episodes(self) -> int:
        return len(self.episodes.rewards)


def _task_episodes(episodes: Iterable[Mapping] | TaskEpisodes, config: HarmoDTConfig) -> TaskEpisodes:
    if isinstance(episodes, TaskEpisodes):
        return episodes
    data = TaskEpisodes([], [], [])
    for index, row in enumerate(episodes):
        missing = [key for key in ("observations", "actions", "rewards") if key not in row]
        if missing:
            raise ValueError(f"Demonstration {index} lacks {missing}: each needs observations, actions and rewards")
        observations = np.asarray(row["observations"], dtype=np.float32)
        actions = np.asarray(row["actions"], dtype=np.float32)
        rewards = np.asarray(row["rewards"], dtype=np.float32).reshape(-1)
        steps = len(rewards)
        if steps == 0 or observations.shape != (steps, config.state_dim) or actions.shape != (steps, config.act_dim):
            raise ValueError(
                f"Demonstration {index}: observations {observations.shape}, actions {actions.shape} and rewards "
                f"({steps},) must be (T, {config.state_dim}), (T, {config.act_dim}) and (T,) with T >= 1"
            )
        if not all(np.isfinite(a).all() for a in (observations, actions, rewards)):
            raise ValueError(f"Demonstration {index} holds NaN or infinite values")
        data.observations.append(observations)
        data.actions.append(actions)
        data.rewards.append(rewards)
    if not data.rewards:
        raise ValueError("No demonstrations given: the new task's prompt and statistics need at least one episode")
    return data


def demonstrations_from_episodes(
    config: HarmoDTConfig,
    task_name: str,
    episodes: Iterable[Mapping] | TaskEpisodes,
    last: int | None = None,
    std_floor: float = 1.0,
) -> TaskDemonstrations:
    """Statistics and prompt of the new task ``task_name`` for the model of ``config`` from its demonstrations.

    Args:
        config: the model's config (dims, prompt length, return scale, the trained tasks' statistics).
        task_name: the new task's name.
        episodes: dicts with ``observations`` (T×state_dim), ``actions`` (T×act_dim) and ``rewards`` (T), in order,
            or a :class:`~.segments.TaskEpisodes`.
        last: use only the last ``last`` episodes (default all).
        std_floor: each dimension's std is at least this × the trained tasks' mean std (0: no floor).
    """
    data = _task_episodes(episodes, config)
    if last is not None:
        if not isinstance(last, int) or isinstance(last, bool) or not 1 <= last <= len(data.rewards):
            raise ValueError(f"last must be in 1..{len(data.rewards)} (the demonstrations given), got {last!r}")
        data = TaskEpisodes(*(values[-last:] for values in (data.observations, data.actions, data.rewards)))
    if not 0 <= std_floor < float("inf"):
        raise ValueError(f"std_floor must be a non-negative number, got {std_floor!r}")
    buffer = EpisodeBuffer({task_name: data}, [task_name])
    mean, std = (values[0] for values in buffer.state_stats())
    trained = trained_task_ids(config)
    floor = std_floor * np.asarray(config.state_std, dtype=np.float64)[trained].mean(axis=0)
    floored = np.flatnonzero(std < floor).tolist()
    std = np.maximum(std, floor)
    prompt = None
    if config.use_prompt:
        task_config = copy.deepcopy(config)  # the new task alone, with its statistics: the sampler of training
        task_config.task_names, task_config.state_mean, task_config.state_std = [task_name], [mean], [std]
        task_config.target_returns = [config.target_returns[0]]
        prompt = {key: value[0] for key, value in SegmentSampler(buffer, task_config).evaluation_prompts().items()}
    return TaskDemonstrations(task_name, data, mean, std, prompt, floored)


def demonstrations_from_dataset(
    config: HarmoDTConfig,
    task_name: str,
    dataset: str | os.PathLike,
    dataset_config: str | None = None,
    last: int | None = None,
    std_floor: float = 1.0,
) -> TaskDemonstrations:
    """:func:`demonstrations_from_episodes` on the episodes of ``task_name`` in a dataset folder or Hub dataset repo.

    ``dataset_config`` defaults to ``<task_name>-near-optimal`` (every dataset folder has per-task configs). Episodes
    are taken in ``episode_index`` order, so ``last=N`` picks the N last episodes of the generator's schedule (the
    noise-free expert episodes of ``harmodt-generate-data``).
    """
    from harmodt_hf.data.loading import load_metaworld_dataset

    dataset_config = dataset_config or f"{task_name}-near-optimal"
    rows = load_metaworld_dataset(dataset, dataset_config)
    rows = rows.select(np.flatnonzero(np.asarray(rows["task_name"]) == task_name))
    if len(rows) == 0:
        raise ValueError(f"{dataset} [{dataset_config}] holds no episode of {task_name!r}")
    if "episode_index" in rows.column_names:
        rows = rows.sort("episode_index")
    columns = rows.select_columns(["observations", "actions", "rewards"]).with_format("numpy")
    return demonstrations_from_episodes(config, task_name, columns, last=last, std_floor=std_floor)


def add_task_from_demonstrations(
    model,
    task_name: str,
    dataset: str | os.PathLike,
    dataset_config: str | None = None,
    last: int | None = None,
    mask: str | None = None,
    merge_threshold: int | None = None,
    std_floor: float = 1.0,
) -> TaskDemonstrations:
    """:func:`demonstrations_from_dataset`, then ``model.add_task`` with their prompt and statistics (and ``mask`` /
    ``merge_threshold`` on a masked model); returns the demonstrations (for adapting the model to them)."""
    if task_name in model.config.task_names:
        raise ValueError(f"Task {task_name!r} is already one of the model's tasks {model.config.task_names}")
    demos = demonstrations_from_dataset(model.config, task_name, dataset, dataset_config, last, std_floor)
    model.add_task(task_name, **demos.add_task_kwargs(), mask=mask, merge_threshold=merge_threshold)
    return demos
