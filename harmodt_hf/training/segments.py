"""Episodes → training segments and prompts (Prompt-DT style), per-task normalisation stats, and the collator."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from harmodt_hf.model.configuration_harmodt import HarmoDTConfig

STD_EPS = 1e-6  # states are normalised as (obs - mean) / (std + STD_EPS), in training and when acting


@dataclass
class TaskEpisodes:
    """All episodes of one task: per-episode arrays of observations (T×obs), actions (T×act) and rewards (T)."""

    observations: list[np.ndarray]
    actions: list[np.ndarray]
    rewards: list[np.ndarray]

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(r) for r in self.rewards])

    @property
    def returns(self) -> np.ndarray:
        return np.array([float(r.sum()) for r in self.rewards])


class EpisodeBuffer:
    """Episodes grouped by task, in the order of ``task_names`` (task id = index)."""

    def __init__(self, tasks: dict[str, TaskEpisodes], task_names: Sequence[str]) -> None:
        missing = [t for t in task_names if t not in tasks or not tasks[t].rewards]
        if missing:
            raise ValueError(f"No episodes for task(s) {missing}; the data holds {sorted(tasks)}")
        self.task_names = list(task_names)
        self.tasks = [tasks[name] for name in self.task_names]

    @classmethod
    def from_episodes(cls, episodes: Iterable[dict], task_names: Sequence[str] | None = None) -> EpisodeBuffer:
        """Build from rows with ``observations``, ``actions``, ``rewards`` and ``task_name`` (e.g. a ``datasets``
        episode dataset). ``task_names`` fixes the task order and may be a subset; default: order of appearance."""
        grouped: dict[str, TaskEpisodes] = {}
        for row in episodes:
            name = row["task_name"]
            if task_names is not None and name not in task_names:
                continue
            bucket = grouped.setdefault(name, TaskEpisodes([], [], []))
            bucket.observations.append(np.asarray(row["observations"], dtype=np.float32))
            bucket.actions.append(np.asarray(row["actions"], dtype=np.float32))
            bucket.rewards.append(np.asarray(row["rewards"], dtype=np.float32))
        return cls(grouped, task_names if task_names is not None else list(grouped))

    @classmethod
    def from_dataset(cls, dataset, task_names: Sequence[str] | None = None) -> EpisodeBuffer:
        """Build from a ``datasets.Dataset`` of episodes (read as numpy, column by column)."""
        columns = ["observations", "actions", "rewards", "task_name"]
        missing = [c for c in columns if c not in dataset.column_names]
        if missing:
            raise ValueError(f"Episode dataset lacks column(s) {missing}; it needs {columns}")
        return cls.from_episodes(dataset.select_columns(columns).with_format("numpy"), task_names)

    def state_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-task observation mean and std over all steps of the task's episodes, shape (num_tasks, obs_dim)."""
        means, stds = [], []
        for task in self.tasks:
            stacked = np.concatenate(task.observations).astype(np.float64)
            means.append(stacked.mean(0))
            stds.append(stacked.std(0))
        return np.stack(means), np.stack(stds)


def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """Undiscounted reward-to-go of every step (γ = 1, as in the official code)."""
    return np.cumsum(rewards[::-1])[::-1].astype(np.float32)


class SegmentSampler:
    """Cuts model-ready training segments and prompts out of an :class:`EpisodeBuffer`.

    Segment: K consecutive steps from an episode chosen with probability ∝ length and a uniform start, left-padded
    to K (padding: zeros, mask 0). States are normalised with the task's mean/std from the config (std + 1e-6);
    returns-to-go are divided by ``config.return_scale``. Training prompt: the ``prompt_length`` steps ending one step
    before the end of a random episode of the same task (steps T−P−1 … T−2, as in Prompt-DT); the evaluation prompt
    of a task is cut the same way from its highest-return episode.

    The buffer's tasks are usually the config's, in its order; they may also be some of them (adapting a model to the
    tasks added after training): tasks are then numbered by the buffer (``sample(task)``), and a segment's
    ``task_ids`` is the model's id of its task (``model_task_ids[task]``). ``with_prompts=False`` leaves the training
    prompts out of the segments (the model then acts with its stored prompts; default: with, if the model uses them).
    """

    def __init__(self, buffer: EpisodeBuffer, config: HarmoDTConfig, with_prompts: bool | None = None) -> None:
        unknown = [name for name in buffer.task_names if name not in config.task_names]
        if unknown:
            raise ValueError(
                f"The data's tasks {unknown} are not among the model's tasks {config.task_names} (they differ from the "
                "data's tasks); build the config with task_names taken from the data"
            )
        self.model_task_ids = [config.task_names.index(name) for name in buffer.task_names]
        if self.model_task_ids != sorted(self.model_task_ids):
            raise ValueError(
                f"The data's tasks {buffer.task_names} are in another order than the model's {config.task_names}: "
                "order the episode buffer by the config's task_names"
            )
        self.with_prompts = config.use_prompt if with_prompts is None else bool(with_prompts)
        if self.with_prompts and not config.use_prompt:
            raise ValueError("with_prompts=True, but the model does not use prompts (config.use_prompt=False)")
        longest = max((int(t.lengths.max()), name) for t, name in zip(buffer.tasks, buffer.task_names, strict=True))
        if longest[0] > config.max_ep_len:
            raise ValueError(
                f"The data holds episodes of up to {longest[0]} steps ({longest[1]}), but max_ep_len is "
                f"{config.max_ep_len}: timesteps from {config.max_ep_len} on have no embedding. Set max_ep_len >= "
                f"{longest[0]} (Meta-World episodes have 500 steps)."
            )
        self.buffer = buffer
        self.config = config
        self.mean = np.asarray(config.state_mean, dtype=np.float32)[self.model_task_ids]
        self.std = np.asarray(config.state_std, dtype=np.float32)[self.model_task_ids] + STD_EPS
        self.rtg = [[returns_to_go(r) for r in task.rewards] for task in buffer.tasks]
        self.length_weights = [task.lengths / task.lengths.sum() for task in buffer.tasks]

    @property
    def num_tasks(self) -> int:
        return len(self.buffer.tasks)

    def buffer_task(self, model_task_id: int) -> int:
        """The buffer's task number of the model's task ``model_task_id`` (a task the data holds)."""
        if model_task_id not in self.model_task_ids:
            name = self.config.task_names[model_task_id]
            raise ValueError(f"Task {name!r} (id {model_task_id}) has no episodes in this data")
        return self.model_task_ids.index(model_task_id)

    def _window(self, task: int, episode: int, start: int, length: int) -> dict[str, np.ndarray]:
        """Steps [start, start+length) of an episode, model-ready and left-padded to ``length``."""
        data = self.buffer.tasks[task]
        obs = data.observations[episode][start : start + length]
        steps = len(obs)
        pad = length - steps
        out = {
            "states": np.zeros((length, self.config.state_dim), np.float32),
            "actions": np.zeros((length, self.config.act_dim), np.float32),
            "returns_to_go": np.zeros((length, 1), np.float32),
            "timesteps": np.zeros(length, np.int64),
            "attention_mask": np.zeros(length, np.int64),
        }
        out["states"][pad:] = (obs - self.mean[task]) / self.std[task]
        out["actions"][pad:] = data.actions[episode][start : start + steps]
        out["returns_to_go"][pad:, 0] = self.rtg[task][episode][start : start + steps] / self.config.return_scale
        out["timesteps"][pad:] = np.arange(start, start + steps)
        out["attention_mask"][pad:] = 1
        return out

    def _prompt_window(self, task: int, episode: int) -> dict[str, np.ndarray]:
        length = self.config.prompt_length
        total = len(self.buffer.tasks[task].rewards[episode])
        start = max(0, total - length - 1)
        return self._window(task, episode, start, length)

    def sample(self, task: int, rng: np.random.Generator) -> dict:
        """One training segment of ``task`` (with its prompt when the model uses prompts)."""
        episode = int(rng.choice(len(self.length_weights[task]), p=self.length_weights[task]))
        total = len(self.buffer.tasks[task].rewards[episode])
        start = int(rng.integers(0, total))
        item = self._window(task, episode, start, self.config.context_length)
        item["task_ids"] = self.model_task_ids[task]
        if self.with_prompts:
            prompt_episode = int(rng.integers(0, len(self.buffer.tasks[task].rewards)))
            item["prompt"] = self._prompt_window(task, prompt_episode)
        return item

    def evaluation_prompts(self) -> dict[str, np.ndarray]:
        """One prompt per task, cut from the task's highest-return episode; stacked over tasks."""
        prompts = [self._prompt_window(t, int(np.argmax(task.returns))) for t, task in enumerate(self.buffer.tasks)]
        return {key: np.stack([p[key] for p in prompts]) for key in prompts[0]}


class SegmentDataset(torch.utils.data.Dataset):
    """A deterministic, index-addressable stream of training segments for ``Trainer``.

    Item ``i`` is drawn with its own generator seeded by ``(seed, i)``, so any process, any resume and any number of
    data workers see the same item ``i``. Which task item ``i`` belongs to depends on ``task_sampling``:

    * ``"round_robin"``: every batch of ``batch_size`` consecutive items is one task, tasks in turn (the official
      schedule: one task per optimizer step and process).
    * ``"all_tasks"``: item ``i`` is task ``i mod num_tasks``; a batch that is a multiple of ``num_tasks`` covers
      every task equally.
    """

    def __init__(
        self,
        sampler: SegmentSampler,
        num_items: int,
        batch_size: int,
        task_sampling: str = "round_robin",
        seed: int = 0,
    ) -> None:
        if task_sampling not in ("round_robin", "all_tasks"):
            raise ValueError(f"task_sampling must be 'round_robin' or 'all_tasks', got {task_sampling!r}")
        if batch_size <= 0 or num_items <= 0:
            raise ValueError("batch_size and num_items must be positive")
        self.sampler = sampler
        self.num_items = num_items
        self.batch_size = batch_size
        self.task_sampling = task_sampling
        self.seed = seed

    def __len__(self) -> int:
        return self.num_items

    def task_of(self, index: int) -> int:
        """The buffer's task number of item ``index`` (``sampler.model_task_ids`` maps it to the model's id)."""
        if self.task_sampling == "round_robin":
            return (index // self.batch_size) % self.sampler.num_tasks
        return index % self.sampler.num_tasks

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        return self.sampler.sample(self.task_of(index), rng)

    @property
    def model_task_ids(self) -> list[int]:
        """The model's ids of the tasks this dataset trains (all of the model's tasks, or some of them)."""
        return list(self.sampler.model_task_ids)

    def task_batch(self, task: int, size: int, seed: Sequence[int]) -> list[dict]:
        """``size`` fresh segments of the model's task ``task`` from a generator seeded by ``seed`` (used by the mask
        update)."""
        rng = np.random.default_rng(list(seed))
        buffer_task = self.sampler.buffer_task(task)
        return [self.sampler.sample(buffer_task, rng) for _ in range(size)]


SEGMENT_DTYPES = {
    "states": torch.float32,
    "actions": torch.float32,
    "returns_to_go": torch.float32,
    "timesteps": torch.int64,
    "attention_mask": torch.int64,
}


def collate_segments(items: list[dict]) -> dict:
    """Stack segments into model inputs, laid out by task (stable sort by task id, so each task is one contiguous
    group and the model needs no reordering); ``labels`` are the target actions. Segments must hold the arrays
    :class:`SegmentSampler` makes (float32 states, actions and returns-to-go, int64 timesteps and mask)."""
    if not items:
        raise ValueError("collate_segments got no segments: a training batch needs at least one")
    items = sorted(items, key=lambda item: item["task_ids"])
    batch: dict = {}
    for key in SEGMENT_DTYPES:
        try:
            batch[key] = torch.from_numpy(np.stack([np.asarray(item[key]) for item in items]))
        except (KeyError, ValueError) as error:
            raise ValueError(f"Segments must all hold {key!r} arrays of one shape: {error}") from None
    batch["task_ids"] = torch.tensor([item["task_ids"] for item in items], dtype=torch.long)
    batch["labels"] = batch["actions"].clone()
    if "prompt" in items[0]:
        batch["prompt"] = {
            key: torch.from_numpy(np.stack([item["prompt"][key] for item in items])) for key in items[0]["prompt"]
        }
    check_batch(batch)
    return batch


def check_batch(batch: dict) -> None:
    """Refuse, with the fix, a training batch that is empty or holds tensors of another dtype than the segments
    of :class:`SegmentSampler` (e.g. float64 states from a custom dataset), before the model sees it."""
    task_ids = batch.get("task_ids")
    if task_ids is None or task_ids.numel() == 0:
        raise ValueError("The training batch is empty (no task_ids): every batch needs at least one segment")
    for group in (batch, batch.get("prompt") or {}):
        for key, dtype in SEGMENT_DTYPES.items():
            if key in group and group[key].dtype != dtype:
                raise ValueError(
                    f"Batch tensor {key!r} is {group[key].dtype}, expected {dtype}: build segments with "
                    f"SegmentSampler or cast them (e.g. np.asarray(x, dtype=np.float32) for states)"
                )
