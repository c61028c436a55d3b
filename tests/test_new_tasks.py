"""Tasks a trained model never saw (issue #19): ``HarmoDTModel.add_task`` (merged / all-ones / copied mask, prompt,
statistics), the save/load round trip (also through ``AutoModel`` with remote code), clear errors, and a prompt and
statistics from real generated demonstrations by the training rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import random_inputs, tiny_prompted_model
from test_remote_code import run_without_harmodt_hf

from harmodt_hf import HarmoDTModel
from harmodt_hf.training.demonstrations import add_task_from_demonstrations, demonstrations_from_dataset
from harmodt_hf.training.segments import STD_EPS

NEW = "reach-wall-v3"


def a_prompt(config, seed: int = 0) -> dict[str, np.ndarray]:
    """One task's model-ready prompt with random values."""
    rng = np.random.default_rng(seed)
    p = config.prompt_length
    return dict(
        states=rng.normal(size=(p, config.state_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(p, config.act_dim)).astype(np.float32),
        returns_to_go=rng.uniform(0, 4, size=(p, 1)).astype(np.float32),
        timesteps=np.arange(p),
        attention_mask=np.ones(p, dtype=np.int64),
    )


def add_new(model, name: str = NEW, seed: int = 0, **kwargs) -> int:
    config = model.config
    stats = dict(state_mean=[0.1 * seed] * config.state_dim, state_std=[1.0 + seed] * config.state_dim)
    return model.add_task(name, prompt=a_prompt(config, seed) if config.use_prompt else None, **stats, **kwargs)


def actions_of(model, task_ids, seed: int = 0) -> torch.Tensor:
    inputs = random_inputs(model.config, task_ids, seed=seed)
    inputs.pop("prompt", None)  # the stored prompts
    with torch.no_grad():
        return model(**inputs).action_preds


def test_merged_mask_keeps_exactly_the_weights_kept_by_threshold_trained_tasks():
    """Brute force over every weight of a small model: the added row keeps a weight iff at least `threshold` trained
    tasks' masks keep it; a task added earlier does not vote; the trained rows stay as they were."""
    model = tiny_prompted_model(sparsity=0.5)
    trained = {name: m.clone() for name, m in model.get_task_masks().items()}
    add_new(model, "first-new", mask="ones")  # an added task (all ones) must not count as a trained task
    for threshold in (1, 2, 3):
        task = add_new(model, f"merged-{threshold}", merge_threshold=threshold)
        masks = model.get_task_masks()
        for name, rows in trained.items():
            votes = rows.numpy()
            kept = masks[name][task].numpy()
            for i, j in itertools.product(range(votes.shape[1]), range(votes.shape[2])):
                assert kept[i, j] == (sum(bool(votes[t, i, j]) for t in range(3)) >= threshold), (name, i, j)
            assert torch.equal(masks[name][:3], rows)
    assert 0 < masks[name][task].float().mean() < masks[name][task - 2].float().mean() < 1  # 3 of 3 < 1 of 3
    assert model.config.added_tasks["merged-2"] == {"mask": "merged", "merge_threshold": 2}


def test_default_threshold_is_half_of_the_trained_tasks_and_other_masks():
    model = tiny_prompted_model(task_names=["reach-v3", "push-v3", "pick-place-v3", "door-open-v3"])
    masks = model.get_task_masks()
    merged = add_new(model, "merged")  # default: 2 of 4 trained tasks
    ones = add_new(model, "ones", mask="ones")
    copied = add_new(model, "copy", mask="push-v3")
    grown = model.get_task_masks()
    for name, rows in masks.items():
        assert torch.equal(grown[name][merged], rows.sum(0) >= 2)
        assert bool(grown[name][ones].all())
        assert torch.equal(grown[name][copied], rows[1])
    assert model.config.added_tasks["merged"]["merge_threshold"] == 2


def test_added_task_round_trips_through_save_and_from_pretrained_and_trained_actions_stay(tmp_path):
    model = tiny_prompted_model(seed=1, target_returns=[1.0, 2.0, 3.0])
    before = actions_of(model, [0, 1, 2, 1])
    task = add_new(model, seed=2, mask="merged")
    assert task == 3 and model.config.task_names[-1] == NEW and model.config.target_returns[-1] == 2.0
    assert torch.equal(actions_of(model, [0, 1, 2, 1]), before)  # adding a task changes no trained task
    model.save_pretrained(tmp_path)
    loaded = HarmoDTModel.from_pretrained(tmp_path).eval()
    assert loaded.config.task_names == model.config.task_names
    assert loaded.config.added_tasks == {NEW: {"mask": "merged", "merge_threshold": 2}}
    np.testing.assert_array_equal(loaded.config.state_mean[3], [0.2] * 39)
    np.testing.assert_array_equal(loaded.config.state_std[3], [3.0] * 39)
    for name, rows in model.get_task_masks().items():
        assert torch.equal(loaded.get_task_masks()[name], rows)
    stored = loaded.task_prompts(torch.tensor([3]))
    for key, value in a_prompt(model.config, 2).items():
        np.testing.assert_array_equal(stored[key][0].numpy().reshape(value.shape), value)
    assert torch.equal(actions_of(loaded, [3, 0, 3, 2]), actions_of(model, [3, 0, 3, 2]))


def test_added_task_loads_through_auto_model_with_remote_code(tmp_path):
    model = tiny_prompted_model(seed=3)
    add_new(model, seed=1, mask="ones")
    model.save_pretrained(tmp_path / "model")
    inputs = random_inputs(model.config, [3, 1, 3], seed=4)
    inputs.pop("prompt")
    torch.save(inputs, tmp_path / "inputs.pt")
    code = """
import numpy as np, torch
from transformers import AutoModel
model = AutoModel.from_pretrained("model", trust_remote_code=True)
assert model.config.task_names[-1] == "reach-wall-v3", model.config.task_names
with torch.no_grad():
    np.save("actions.npy", model(**torch.load("inputs.pt")).action_preds.numpy())
"""
    run_without_harmodt_hf(code, tmp_path, HF_HUB_OFFLINE="1")
    with torch.no_grad():
        expected = model(**inputs).action_preds.numpy()
    np.testing.assert_allclose(np.load(tmp_path / "actions.npy"), expected, rtol=0, atol=1e-6)


def test_unmasked_model_takes_a_new_task_with_a_prompt_only(tmp_path):
    model = tiny_prompted_model(mask_mode="none")
    with pytest.raises(ValueError, match="no task masks"):
        add_new(model, mask="merged")
    task = add_new(model, seed=1)
    model.save_pretrained(tmp_path)
    loaded = HarmoDTModel.from_pretrained(tmp_path).eval()
    assert loaded.config.task_names[task] == NEW
    assert torch.equal(actions_of(loaded, [task, 0]), actions_of(model, [task, 0]))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(name="push-v3"), "already one of the model's"),
        (dict(prompt_states=np.zeros((2, 12), np.float32)), r"prompt states must be \(prompt_length=2, 39\)"),
        (dict(prompt_actions=np.zeros((3, 4), np.float32)), r"prompt actions must be \(prompt_length=2, 4\)"),
        (dict(state_mean=[0.0] * 12), "state_mean must hold state_dim=39"),
        (dict(merge_threshold=0), r"merge_threshold must be in 1\.\.3"),
        (dict(merge_threshold=4), r"merge_threshold must be in 1\.\.3"),
        (dict(mask="ones", merge_threshold=2), "merge_threshold is for mask='merged' only"),
        (dict(mask="push"), "mask must be one of"),
        (dict(prompt=None), "uses task prompts: pass prompt="),
    ],
)
def test_bad_new_task_input_is_refused_clearly_and_changes_nothing(change, message):
    model = tiny_prompted_model()
    config = model.config
    prompt = a_prompt(config)
    for key in ("states", "actions"):
        if f"prompt_{key}" in change:
            prompt[key] = change.pop(f"prompt_{key}")
    kwargs = dict(prompt=prompt, state_mean=[0.0] * 39, state_std=[1.0] * 39)
    kwargs.update(change)
    name = kwargs.pop("name", NEW)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        model.add_task(name, **kwargs)
    assert config.task_names == ["reach-v3", "push-v3", "pick-place-v3"] and len(config.state_mean) == 3
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_prompt_and_statistics_from_demonstrations_follow_the_training_rule(generated_dataset):
    """Real generated episodes read with datasets: the mean/std of the last N episodes' observations (std floored by
    the trained tasks' mean std), and the prompt cut from the highest-return one (steps T-P-1 .. T-2, normalised)."""
    from harmodt_hf.data.loading import load_metaworld_dataset

    model = tiny_prompted_model(return_scale=10.0, state_std=[[0.5] * 39] * 3, max_ep_len=500)
    demos = add_task_from_demonstrations(model, "drawer-close-v3", generated_dataset, last=2)
    rows = load_metaworld_dataset(generated_dataset, "drawer-close-v3-near-optimal").sort("episode_index")
    episodes = [rows[i] for i in range(len(rows))][-2:]
    observations = np.concatenate([np.asarray(e["observations"], np.float32) for e in episodes])
    mean = observations.astype(np.float64).mean(0)
    std = np.maximum(observations.astype(np.float64).std(0), 0.5)
    np.testing.assert_allclose(model.config.state_mean[3], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.config.state_std[3], std, rtol=1e-5, atol=1e-6)
    assert demos.floored_dims == np.flatnonzero(observations.std(0) < 0.5).tolist() != []
    best = max(episodes, key=lambda e: float(np.sum(e["rewards"])))
    steps = len(best["rewards"])
    p = model.config.prompt_length
    expected_states = (np.asarray(best["observations"])[steps - p - 1 : steps - 1] - mean) / (std + STD_EPS)
    returns_to_go = np.cumsum(np.asarray(best["rewards"], np.float64)[::-1])[::-1]
    stored = model.task_prompts(torch.tensor([3]))
    np.testing.assert_allclose(stored["states"][0].numpy(), expected_states, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stored["actions"][0].numpy(), np.asarray(best["actions"])[steps - p - 1 : steps - 1])
    np.testing.assert_allclose(
        stored["returns_to_go"][0, :, 0].numpy(), returns_to_go[steps - p - 1 : steps - 1] / 10.0, rtol=1e-4
    )
    assert demos.num_episodes == 2 and model.config.added_tasks["drawer-close-v3"]["mask"] == "merged"
    with pytest.raises(ValueError, match="holds no episode of 'door-open-v3'"):
        demonstrations_from_dataset(model.config, "door-open-v3", generated_dataset, "drawer-close-v3-near-optimal")
    with pytest.raises(ValueError, match=r"last must be in 1\.\.4"):
        demonstrations_from_dataset(model.config, "reach-v3", generated_dataset, last=5)
