"""HarmoDTPolicy: model inputs built from the config, slots and subsets, prompt encoding, precision, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import capture_forward_inputs, random_inputs, small_matmuls_follow_row_count, tiny_prompted_model

from harmodt_hf import HarmoDTModel
from harmodt_hf.evaluation.rollouts import HarmoDTPolicy

TWO_TASKS = ["reach-v3", "push-v3"]


@pytest.fixture(scope="module")
def model() -> HarmoDTModel:
    return tiny_prompted_model()


def test_policy_builds_the_model_inputs_from_the_config():
    """Normalised states, scaled and decremented return-to-go, timesteps, left padding and zero action slots."""
    model = tiny_prompted_model(
        state_mean=[[0.5 * (t + 1)] * 39 for t in range(3)],
        state_std=[[2.0 + t] * 39 for t in range(3)],
        target_returns=[1000.0, 2000.0, 3000.0],
        return_scale=500.0,
    )
    config = model.config
    policy = HarmoDTPolicy(model, cache_prompt=False)  # the raw prompt goes in: checked below
    policy.reset(["pick-place-v3", 0])
    calls, hook = capture_forward_inputs(model)
    rng = np.random.default_rng(0)
    observations = [rng.normal(size=(2, 39)) for _ in range(6)]
    rewards = [None] + [rng.uniform(0, 10, size=2) for _ in range(5)]
    try:
        actions = [policy.act(obs, rew) for obs, rew in zip(observations, rewards, strict=True)]
    finally:
        hook.remove()
    k = config.context_length
    last = calls[-1]
    assert last["task_ids"].tolist() == [2, 0]
    for slot, (task, mean, std, target) in enumerate([(2, 1.5, 4.0, 3000.0), (0, 0.5, 2.0, 1000.0)]):
        expected_states = (np.stack([o[slot] for o in observations[-k:]]) - mean) / (std + 1e-6)
        np.testing.assert_allclose(last["states"][slot].numpy(), expected_states, rtol=1e-6, atol=1e-6)
        received = np.cumsum([0.0] + [r[slot] for r in rewards[1:]])
        np.testing.assert_allclose(last["returns_to_go"][slot, :, 0].numpy(), (target - received[-k:]) / 500.0, 1e-6)
        assert last["timesteps"][slot].tolist() == list(range(6 - k, 6))
        np.testing.assert_array_equal(last["actions"][slot, :-1].numpy(), np.stack([a[slot] for a in actions[-k:-1]]))
        assert not last["actions"][slot, -1].any()  # the current step's action slot is zero
        for key in ("states", "returns_to_go", "timesteps"):
            assert torch.equal(last["prompt"][key][slot], model.task_prompts(torch.tensor([task]))[key][0])
    first = calls[0]  # left padding at the first step
    assert first["attention_mask"].tolist() == [[0] * (k - 1) + [1]] * 2
    assert not first["states"][:, :-1].any() and not first["actions"].any() and not first["timesteps"].any()
    np.testing.assert_allclose(first["returns_to_go"][:, -1, 0].numpy(), [6.0, 2.0])
    assert not first["returns_to_go"][:, :-1].any()
    assert policy.steps == [6, 6]


def test_policy_actions_follow_the_config_stats_and_targets():
    obs = np.random.default_rng(1).normal(size=(1, 39))

    def first_action(**overrides):
        policy = HarmoDTPolicy(tiny_prompted_model(**overrides))
        policy.reset(["push-v3"])
        return policy.act(obs)[0]

    base = first_action()
    assert np.array_equal(base, first_action())
    assert not np.allclose(base, first_action(state_mean=[[0.3] * 39] * 3))
    assert not np.allclose(base, first_action(state_std=[[5.0] * 39] * 3))
    assert not np.allclose(base, first_action(target_returns=[4500.0, 100.0, 4500.0]))
    assert np.array_equal(base, first_action(target_returns=[100.0, 4500.0, 100.0]))  # other tasks' rows unused
    assert not np.allclose(base, first_action(return_scale=10.0))


def test_policy_slots_active_subsets_and_resets(model):
    """Acting for a subset only computes that subset; restarting a slot starts a fresh episode there."""
    rng = np.random.default_rng(2)
    obs = [rng.normal(size=(3, 39)) for _ in range(3)]
    policy = HarmoDTPolicy(model)
    policy.reset(TWO_TASKS + ["pick-place-v3"])
    calls, hook = capture_forward_inputs(model)
    try:
        policy.act(obs[0])
        subset = policy.act(obs[1][[0, 2]], rewards=[1.0, 2.0], active=[0, 2])
        policy.reset(["pick-place-v3"], slots=[1])
        restarted = policy.act(obs[2][[1]], active=[1])
    finally:
        hook.remove()
    assert [c["states"].shape[0] for c in calls] == [3, 2, 1]
    assert policy.steps == [2, 1, 2] and policy.task_ids == [0, 2, 2]

    for slot, task in ((0, "reach-v3"), (2, "pick-place-v3")):
        alone = HarmoDTPolicy(model)
        alone.reset([task])
        alone.act(obs[0][[slot]])
        reward = [1.0] if slot == 0 else [2.0]
        # 1 row against 2: exact where small matmuls ignore the row count, else float rounding (a step, no simulator)
        atol = 1e-6 if small_matmuls_follow_row_count() else 0.0
        np.testing.assert_allclose(alone.act(obs[1][[slot]], reward)[0], subset[[0, 2].index(slot)], atol=atol)
    fresh = HarmoDTPolicy(model)
    fresh.reset(["pick-place-v3"])
    np.testing.assert_array_equal(fresh.act(obs[2][[1]])[0], restarted[0])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_policy_prompt_cache_acts_like_feeding_the_prompt(model, precision, one_torch_thread):
    """cache_prompt=True (the default) passes each task's prompt encoded once (the model sees no prompt tokens) and
    gives the actions of feeding the prompt at every step, up to float rounding; restarting a slot with another task
    re-encodes that slot's prompt."""
    rng = np.random.default_rng(4)
    obs = [rng.normal(size=(3, 39)) for _ in range(4)]
    rewards = [None] + [rng.uniform(0, 5, size=3) for _ in range(3)]
    tasks = ["push-v3", "reach-v3", "push-v3"]
    policies = {cache: HarmoDTPolicy(model, precision=precision, cache_prompt=cache) for cache in (True, False)}
    actions = {}
    calls, hook = capture_forward_inputs(model)
    try:
        for cache, policy in policies.items():
            policy.reset(tasks)
            actions[cache] = [policy.act(o, r) for o, r in zip(obs[:3], rewards[:3], strict=True)]
            policy.reset(["pick-place-v3"], slots=[1])
            actions[cache].append(policy.act(obs[3][[1]], active=[1]))
    finally:
        hook.remove()
    cached_calls, fed_calls = calls[:4], calls[4:]
    assert all(c["prompt"] is None and c["prompt_key_values"] is not None for c in cached_calls)
    assert all(c["prompt"] is not None and c["prompt_key_values"] is None for c in fed_calls)
    assert cached_calls[-1]["prompt_key_values"].task_ids.tolist() == [2]
    tolerance = 1e-5 if precision == "fp32" else 3e-2  # bf16: activations rounded at different row counts
    for cached, fed in zip(actions[True], actions[False], strict=True):
        np.testing.assert_allclose(cached, fed, atol=tolerance)
    # Not vacuous: the restarted slot acts for pick-place with its fresh prompt, unlike the old reach episode.
    fresh = HarmoDTPolicy(model, precision=precision)
    fresh.reset(["pick-place-v3"])
    np.testing.assert_array_equal(fresh.act(obs[3][[1]]), actions[True][-1])


def test_policy_picks_the_encoded_prompts_of_a_slot_subset_once(model):
    """Acting for the same subset of slots step after step reuses one copy of their encoded prompts (a pipelined
    evaluation alternates two subsets); a reset makes a fresh one."""
    rng = np.random.default_rng(5)
    policy = HarmoDTPolicy(model)
    policy.reset(TWO_TASKS + ["pick-place-v3", "push-v3"])
    calls, hook = capture_forward_inputs(model)
    try:
        for step in range(3):
            for wave in ([0, 2], [1, 3]):
                rewards = None if step == 0 else rng.uniform(0, 1, size=2)
                policy.act(rng.normal(size=(2, 39)), rewards, active=wave)
        policy.reset(["reach-v3"], slots=[2])
        policy.act(rng.normal(size=(2, 39)), active=[0, 2], rewards=[0.5, 0.0])
    finally:
        hook.remove()
    picked = [c["prompt_key_values"] for c in calls]
    assert picked[0] is picked[2] is picked[4] and picked[1] is picked[3] is picked[5] and picked[0] is not picked[1]
    assert picked[0].task_ids.tolist() == [0, 2] and picked[1].task_ids.tolist() == [1, 1]
    assert picked[6] is not picked[0] and picked[6].task_ids.tolist() == [0, 0]


def test_policy_precision_is_its_own_whatever_autocast_encloses_it(model):
    """fp32 stays fp32 inside an enclosing bf16 autocast region (e.g. a training step's); bf16 is bf16 either way;
    actions come back as float32."""
    obs = np.random.default_rng(3).normal(size=(2, 39))

    def first_actions(precision: str, enclosing_autocast: bool) -> np.ndarray:
        policy = HarmoDTPolicy(model, precision=precision)
        policy.reset(TWO_TASKS)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enclosing_autocast):
            return policy.act(obs)

    fp32, bf16 = first_actions("fp32", False), first_actions("bf16", False)
    assert fp32.dtype == bf16.dtype == np.float32 and not np.array_equal(fp32, bf16)
    np.testing.assert_array_equal(first_actions("fp32", True), fp32)
    np.testing.assert_array_equal(first_actions("bf16", True), bf16)


def test_policy_builds_the_masked_weights_once_and_acts_on_the_last_action_only(one_torch_thread):
    """The policy keeps each task's masked weights in the model between steps (no call from the user), whatever the
    precision it switches to, and a later forward outside it drops them; each step's forward asks for the last
    action only, with the same actions as full forwards up to float rounding."""
    model = tiny_prompted_model()
    layer = model.transformer.h[0].attn.c_attn
    obs = np.random.default_rng(5).normal(size=(3, 2, 39))
    tasks = TWO_TASKS + ["reach-v3"]
    calls, hook = capture_forward_inputs(model)
    actions = {}
    try:
        for last_only in (True, False):
            policy = HarmoDTPolicy(model, last_action_only=last_only)
            policy.reset(tasks)
            actions[last_only] = [policy.act(o.repeat(2, 0)[:3], None if i == 0 else [1.0] * 3) for i, o in
                                  enumerate(obs)]  # fmt: skip
            assert layer.weight_cache.weights and not layer.cache_masked_weights  # built, kept, flag restored
    finally:
        hook.remove()
    assert [c["last_action_only"] for c in calls] == [True] * 3 + [False] * 3
    for last_only, full in zip(actions[True], actions[False], strict=True):
        np.testing.assert_allclose(last_only, full, atol=1e-6)
    cache = layer.weight_cache.weights
    for precision in ("bf16", "fp32"):  # the cached bias and weights follow the compute dtype
        policy = HarmoDTPolicy(model, precision=precision)
        policy.reset(tasks)
        assert policy.act(obs[0].repeat(2, 0)[:3]).shape == (3, 4)
    assert layer.weight_cache.weights is not cache
    inputs = random_inputs(model.config, [0, 1], seed=1)
    with torch.no_grad():
        model(**inputs)
    assert not layer.weight_cache.weights  # a forward outside the policy drops the masked copies


def test_policy_bad_inputs(model):
    policy = HarmoDTPolicy(model)
    with pytest.raises(ValueError, match="door-open-v3.*not one of this model's"):
        policy.reset(["door-open-v3"])
    with pytest.raises(ValueError, match="task id"):
        policy.reset([3])
    policy.reset(TWO_TASKS)
    with pytest.raises(ValueError, match="state_dim=39"):
        policy.act(np.zeros((2, 38)))
    with pytest.raises(ValueError, match="2 observations for 1 active"):
        policy.act(np.zeros((2, 39)), active=[0])
    with pytest.raises(ValueError, match="slot indices"):
        policy.act(np.zeros((1, 39)), active=[5])
    policy.act(np.zeros((2, 39)))
    with pytest.raises(ValueError, match="rewards are required"):
        policy.act(np.zeros((2, 39)))
    with pytest.raises(ValueError, match="reset got 2 tasks for 1 slots"):
        policy.reset(TWO_TASKS, slots=[0])
    unprompted = tiny_prompted_model(use_prompt=True)
    unprompted.stored_prompt_attention_mask.zero_()
    with pytest.raises(ValueError, match="no stored prompt"):
        HarmoDTPolicy(unprompted).reset(["reach-v3"])


@pytest.mark.parametrize(
    ("bad_call", "message"),
    [
        ("nan_observation", r"non-finite observation for slot 1 \(push-v3\): no slot was changed"),
        ("nan_reward", r"non-finite reward for slot 0 \(reach-v3\)"),
        ("huge_reward", r"non-finite action for slot 1 \(push-v3\)"),
        ("overflowing_reward", r"return-to-go of slot 0 \(reach-v3\) leaves the range of torch.float32"),
    ],
)
def test_a_rejected_call_changes_no_slot(tmp_path, bad_call, message, one_torch_thread):
    """A call rejected for one slot (bad input, or a non-finite action) leaves every slot as it was: the episodes go
    on exactly as those of a policy that never saw the call (a saved and reloaded model)."""
    tiny_prompted_model().save_pretrained(tmp_path / "model")
    model = HarmoDTModel.from_pretrained(tmp_path / "model").eval()
    rng = np.random.default_rng(0)
    observations = [rng.normal(size=(2, 39)) for _ in range(5)]
    rewards = [None] + [rng.uniform(0, 10, size=2) for _ in range(4)]
    policy, reference = HarmoDTPolicy(model), HarmoDTPolicy(model)
    policy.reset(TWO_TASKS)
    reference.reset(TWO_TASKS)
    for obs, rew in zip(observations[:2], rewards[:2], strict=True):
        np.testing.assert_array_equal(policy.act(obs, rew), reference.act(obs, rew))
    bad_obs, bad_rew = observations[2].copy(), rewards[2].copy()
    if bad_call == "nan_observation":
        bad_obs[1, 7] = np.nan
    elif bad_call == "nan_reward":
        bad_rew[0] = np.nan
    elif bad_call == "huge_reward":
        bad_rew[1] = 1e30
    else:
        bad_rew[0] = -1e45  # the return-to-go no longer fits in float32
    with pytest.raises(ValueError, match=message):
        policy.act(bad_obs, bad_rew)
    assert policy.steps == [2, 2]
    for obs, rew in zip(observations[2:], rewards[2:], strict=True):
        actions = policy.act(obs, rew)
        assert np.isfinite(actions).all()
        np.testing.assert_array_equal(actions, reference.act(obs, rew))
