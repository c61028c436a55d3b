"""Training segments and prompts from hand-built episodes: state normalisation, return scaling, padding."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TASKS, tiny_config

from harmodt_hf.training.segments import EpisodeBuffer, SegmentDataset, SegmentSampler

EPS = 1e-6  # documented: states are normalised as (obs - mean) / (std + 1e-6), std + 1e-6 as in the official code


def hand_built(num_episodes: int = 2, length: int = 7):
    """Episodes whose observations are known numbers, per-task stats that are not the data's (std 0 in one
    dimension: there only the eps keeps the division finite), and a config that carries those stats."""
    rng = np.random.default_rng(3)
    mean = rng.uniform(-2, 2, (len(TASKS), 39))
    std = rng.uniform(0.1, 3.0, (len(TASKS), 39))
    mean[:, 5], std[:, 5] = 0.0, 0.0  # a constant feature: its observations are 2e-6 → normalised to 2
    rows = []
    for task, name in enumerate(TASKS):
        for episode in range(num_episodes):
            obs = rng.uniform(-5, 5, (length, 39)).astype(np.float32)
            obs[:, 5] = 2e-6
            actions = np.full((length, 4), episode / 10 + task, np.float32)  # tells which episode a segment is from
            rewards = np.arange(1, length + 1, dtype=np.float32) * (task + 1) * (episode + 1)  # episode 1: best
            rows.append(dict(observations=obs, actions=actions, rewards=rewards, task_name=name))
    config = tiny_config(state_mean=mean.tolist(), state_std=std.tolist(), return_scale=50.0)
    buffer = EpisodeBuffer.from_episodes(rows, TASKS)
    return buffer, config, mean, std


def expected_window(buffer, config, mean, std, task: int, episode: int, steps: np.ndarray):
    obs = buffer.tasks[task].observations[episode].astype(np.float64)[steps]
    rewards = buffer.tasks[task].rewards[episode].astype(np.float64)
    rtg = np.array([rewards[s:].sum() for s in steps]) / config.return_scale
    return (obs - mean[task]) / (std[task] + EPS), rtg


@pytest.mark.parametrize("task_sampling", ["round_robin", "all_tasks"])
def test_segment_states_are_normalised_with_the_tasks_stats(task_sampling):
    buffer, config, mean, std = hand_built()
    dataset = SegmentDataset(SegmentSampler(buffer, config), num_items=24, batch_size=3, task_sampling=task_sampling)
    padded = 0
    for index in range(len(dataset)):
        item = dataset[index]
        task = item["task_ids"]
        assert task == dataset.task_of(index)
        real = item["attention_mask"].astype(bool)
        steps = item["timesteps"][real]
        episode = int(round((item["actions"][real][0, 0] - task) * 10))
        states, rtg = expected_window(buffer, config, mean, std, task, episode, steps)
        np.testing.assert_allclose(item["states"][real], states, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(item["states"][real][:, 5], 2.0, rtol=1e-5)  # 2e-6 / (0 + 1e-6)
        np.testing.assert_allclose(item["returns_to_go"][real][:, 0], rtg, rtol=1e-6)
        assert not item["states"][~real].any() and not item["returns_to_go"][~real].any()  # left padding is zeros
        padded += int((~real).any())
        # the training prompt: the steps ending one before the end of an episode of the same task
        prompt = item["prompt"]
        p_real = prompt["attention_mask"].astype(bool)
        p_episode = int(round((prompt["actions"][p_real][0, 0] - task) * 10))
        p_states, _ = expected_window(buffer, config, mean, std, task, p_episode, prompt["timesteps"][p_real])
        np.testing.assert_allclose(prompt["states"][p_real], p_states, rtol=1e-5, atol=1e-5)
    assert padded > 0  # some segments start near an episode's start and are padded


def test_evaluation_prompts_are_normalised_with_the_tasks_stats():
    buffer, config, mean, std = hand_built()
    prompts = SegmentSampler(buffer, config).evaluation_prompts()
    for task in range(len(TASKS)):
        best = int(np.argmax(buffer.tasks[task].returns))
        assert best == 1
        steps = prompts["timesteps"][task]
        assert steps.tolist() == list(range(7 - config.prompt_length - 1, 7 - 1))  # steps T-P-1 .. T-2
        states, rtg = expected_window(buffer, config, mean, std, task, best, steps)
        np.testing.assert_allclose(prompts["states"][task], states, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(prompts["returns_to_go"][task][:, 0], rtg, rtol=1e-6)
