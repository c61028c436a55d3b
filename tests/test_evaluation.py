"""HarmoDTPolicy, batched evaluation, crash reporting, plots/videos and SuccessRateCallback on real Meta-World envs."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from helpers import tiny_config
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from harmodt_hf import HarmoDTModel
from harmodt_hf.eval_callback import SuccessRateCallback
from harmodt_hf.evaluation import HarmoDTPolicy, episode_reset_seed, evaluate, plot_success
from harmodt_hf.tasks import make_env

logging.disable_progress_bar()
TWO_TASKS = ["reach-v3", "push-v3"]


def make_model(seed: int = 0, **overrides) -> HarmoDTModel:
    """A tiny HarmoDTModel (tasks reach, push, pick-place) with random weights and random stored prompts."""
    torch.manual_seed(seed)
    model = HarmoDTModel(tiny_config(**overrides)).eval()
    config = model.config
    if config.use_prompt:
        g = torch.Generator().manual_seed(seed + 1)
        t, p = config.num_tasks, config.prompt_length
        model.set_task_prompts(
            dict(
                states=torch.randn(t, p, config.state_dim, generator=g),
                actions=torch.rand(t, p, config.act_dim, generator=g) * 2 - 1,
                returns_to_go=torch.rand(t, p, 1, generator=g) * 4,
                timesteps=torch.arange(p).repeat(t, 1),
                attention_mask=torch.ones(t, p, dtype=torch.long),
            )
        )
    return model


@pytest.fixture(scope="module")
def model() -> HarmoDTModel:
    return make_model()


def run_one_episode(
    model, task: str, episode: int, seed: int, max_steps: int, precision: str = "fp32"
) -> tuple[np.ndarray, bool, float]:
    """The reference: one episode at a time with a batch-1 policy (actions, success at any step, return)."""
    policy = HarmoDTPolicy(model, precision=precision)
    policy.reset([task])
    env = make_env(task, episode, seed)
    obs, _ = env.reset(seed=episode_reset_seed(seed, task, episode))
    actions, success, total, reward = [], False, 0.0, None
    for _ in range(max_steps):
        action = policy.act(obs[None], None if reward is None else [reward])[0]
        actions.append(action)
        obs, reward, terminated, truncated, info = env.step(action)
        total += reward
        success |= bool(info["success"])
        if terminated or truncated:
            break
    env.close()
    return np.array(actions), success, total


# ------------------------------------------------------------------------------------------------ test env factories
# Module level so that worker processes can unpickle them.
def factory_failing_on_push(task: str, goal_index: int, seed: int):
    if task == "push-v3":
        raise OSError("simulated MuJoCo failure while building push-v3")
    return make_env(task, goal_index, seed)


class _FailingStep:
    """A real env whose ``step`` fails (``mode='raise'``) or whose process dies (``mode='exit'``) at step 3."""

    def __init__(self, env, mode: str) -> None:
        self.env, self.mode, self.steps = env, mode, 0

    def reset(self, **kwargs):
        return self.env.reset(**kwargs)

    def step(self, action):
        self.steps += 1
        if self.steps == 3:
            if self.mode == "exit":
                os._exit(3)
            raise FloatingPointError("simulated simulator blow-up at step 3")
        return self.env.step(action)

    def close(self):
        self.env.close()


def factory_step_raises_on_reach(task: str, goal_index: int, seed: int):
    env = make_env(task, goal_index, seed)
    return _FailingStep(env, "raise") if (task, goal_index) == ("reach-v3", 1) else env


def factory_worker_dies_on_reach(task: str, goal_index: int, seed: int):
    env = make_env(task, goal_index, seed)
    return _FailingStep(env, "exit") if (task, goal_index) == ("reach-v3", 1) else env


class _SuccessAt:
    """A real env that additionally reports success at step ``at`` (to exercise stop-on-success)."""

    def __init__(self, env, at: int) -> None:
        self.env, self.at, self.steps = env, at, 0

    def reset(self, **kwargs):
        self.steps = 0
        return self.env.reset(**kwargs)

    def step(self, action):
        self.steps += 1
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.steps == self.at:
            info = {**info, "success": 1.0}
        return obs, reward, terminated, truncated, info

    def close(self):
        self.env.close()


def factory_push_succeeds_at_step_5(task: str, goal_index: int, seed: int):
    env = make_env(task, goal_index, seed)
    return _SuccessAt(env, 5 + goal_index) if task == "push-v3" else env


# ------------------------------------------------------------------------------------------------ faithfulness
@pytest.fixture
def one_torch_thread():
    """Single-threaded CPU kernels: their results do not depend on the batch size (measured bit-exact at batch 30,
    whereas 2 threads change the last bits, ~3e-7, of a batch-30 forward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_batched_evaluation_matches_one_episode_at_a_time(model, one_torch_thread):
    """All 4 episodes batched (2 tasks x 2 goals, env workers, pipelined) give the same actions as batch-1
    episodes."""
    seed, max_steps = 3, 40
    results = evaluate(
        model,
        tasks=TWO_TASKS,
        episodes_per_task=2,
        seed=seed,
        max_steps=max_steps,
        stop_on_success=False,
        num_workers=2,
        record_actions=True,
        torch_threads=1,
    )
    assert results["torch_threads"] == 1 and results["num_workers"] == 2 and results["pipeline"]
    episodes = []
    for task in TWO_TASKS:
        entry = results["per_task"][task]
        for e in range(2):
            reference, success, total = run_one_episode(model, task, e, seed, max_steps)
            batched = np.array(entry["actions"][e], dtype=np.float32)
            assert batched.shape == (max_steps, 4)
            # Exact: batching changes no bit (see one_torch_thread).
            np.testing.assert_array_equal(batched, reference)
            assert entry["successes"][e] == success
            assert entry["returns"][e] == pytest.approx(total, rel=1e-12)
            assert entry["episode_lengths"][e] == max_steps
            episodes.append(batched)
    # The comparison is not vacuous: actions move within an episode and differ between episodes.
    assert all(ep.std(axis=0).min() > 1e-3 for ep in episodes)
    assert np.abs(episodes[0] - episodes[1]).max() > 1e-3
    assert np.abs(episodes[0] - episodes[2]).max() > 1e-3


def test_bf16_batched_evaluation_matches_one_episode_at_a_time_and_keeps_the_protocol(model, one_torch_thread):
    """precision="bf16": batched episodes equal batch-1 bf16 episodes bit for bit, differ from fp32 ones by bf16
    rounding, and the run has the same episodes, seeds and result keys as an fp32 run (plus the precision)."""
    seed, max_steps = 2, 12
    kwargs = dict(tasks=TWO_TASKS, episodes_per_task=2, seed=seed, max_steps=max_steps, stop_on_success=False,
                  num_workers=0, record_actions=True, torch_threads=1)  # fmt: skip
    bf16 = evaluate(model, precision="bf16", **kwargs)
    fp32 = evaluate(model, **kwargs)
    assert bf16["precision"] == "bf16" and fp32["precision"] == "fp32"
    assert set(bf16) == set(fp32)
    for key in ("tasks", "seed", "episodes_per_task", "max_steps", "stop_on_success", "target_returns", "env_steps"):
        assert bf16[key] == fp32[key], key
    for task in TWO_TASKS:
        b, f = bf16["per_task"][task], fp32["per_task"][task]
        assert set(b) == set(f)
        for key in ("episodes", "goal_indices", "reset_seeds", "episode_lengths", "target_return"):
            assert b[key] == f[key], key
        for e in range(2):
            reference, success, total = run_one_episode(model, task, e, seed, max_steps, precision="bf16")
            batched = np.array(b["actions"][e], dtype=np.float32)
            np.testing.assert_array_equal(batched, reference)  # batching changes no bit under bf16 either
            assert b["successes"][e] == success and b["returns"][e] == pytest.approx(total, rel=1e-12)
            # Same first observation: the first actions differ by bf16 rounding only (and do differ: bf16 was used).
            first = np.abs(batched[0] - np.array(f["actions"][e][0], dtype=np.float32)).max()
            assert 0 < first < 0.05


def test_stop_on_success_ends_episodes_and_keeps_others_exact(model):
    """Push episodes end at their (forced) first success; reach episodes go on with unchanged actions."""
    kwargs = dict(tasks=TWO_TASKS, episodes_per_task=2, seed=0, max_steps=20, num_workers=0, record_actions=True)
    stopped = evaluate(model, stop_on_success=True, env_factory=factory_push_succeeds_at_step_5, **kwargs)
    full = evaluate(model, stop_on_success=False, env_factory=factory_push_succeeds_at_step_5, **kwargs)
    push, reach = stopped["per_task"]["push-v3"], stopped["per_task"]["reach-v3"]
    assert push["episode_lengths"] == [5, 6] and push["successes"] == [True, True] and push["success_rate"] == 1.0
    assert full["per_task"]["push-v3"]["episode_lengths"] == [20, 20]
    assert full["per_task"]["push-v3"]["successes"] == [True, True]  # success at any step, not at the end
    assert reach["episode_lengths"] == [20, 20] and reach["success_rate"] == 0.0
    assert stopped["mean_success_rate"] == 0.5
    assert stopped["env_steps"] == 5 + 6 + 40
    for e in range(2):  # shrinking the batch leaves the remaining episodes' actions untouched
        assert reach["actions"][e] == full["per_task"]["reach-v3"]["actions"][e]
        assert push["actions"][e] == full["per_task"]["push-v3"]["actions"][e][: 5 + e]


@pytest.mark.slow
def test_pipelined_evaluation_gives_the_same_results(model, one_torch_thread):
    """With two env workers the policy acts for one wave of episodes while the other wave's envs step (the default);
    results equal the unpipelined run's, including episodes that end early (push succeeds at its 5th/6th step)."""
    kwargs = dict(tasks=TWO_TASKS, episodes_per_task=2, seed=1, max_steps=15, num_workers=2, record_actions=True,
                  env_factory=factory_push_succeeds_at_step_5, torch_threads=1)  # fmt: skip
    piped = evaluate(model, **kwargs)
    plain = evaluate(model, pipeline=False, **kwargs)
    assert piped["pipeline"] is True and plain["pipeline"] is False
    assert piped["per_task"]["push-v3"]["episode_lengths"] == [5, 6]
    assert piped["per_task"]["reach-v3"]["episode_lengths"] == [15, 15]
    for task in TWO_TASKS:
        for key in ("actions", "successes", "returns", "episode_lengths"):
            assert piped["per_task"][task][key] == plain["per_task"][task][key], (task, key)


def test_results_are_json_and_describe_the_run(model, tmp_path):
    model.config._name_or_path = "someone/harmodt-tiny"
    results = evaluate(model, tasks="reach-v3,push-v3", episodes_per_task=2, seed=7, max_steps=10, num_workers=0)
    again = json.loads(json.dumps(results))
    assert again == results
    assert results["tasks"] == TWO_TASKS and results["seed"] == 7 and results["episodes_per_task"] == 2
    assert results["stop_on_success"] is True and results["max_steps"] == 10
    assert 0 < results["env_setup_s"] < results["wall_time_s"] and results["pipeline"] is False  # in-process envs
    assert results["target_returns"] == {"reach-v3": 4500.0, "push-v3": 4500.0}
    assert results["model"]["name_or_path"] == "someone/harmodt-tiny"
    assert "commit_hash" in results["model"]
    for task in TWO_TASKS:
        entry = results["per_task"][task]
        assert set(entry) >= {"success_rate", "mean_return", "mean_episode_length", "episodes", "successes"}
        assert entry["episodes"] == 2 and len(entry["successes"]) == 2 and entry["goal_indices"] == [0, 1]
        assert entry["reset_seeds"] == [episode_reset_seed(7, task, e) for e in range(2)]
        assert entry["mean_return"] == pytest.approx(np.mean(entry["returns"])) and entry["mean_return"] > 0
    assert results["mean_success_rate"] == np.mean([e["success_rate"] for e in results["per_task"].values()])
    assert model.training is False  # the mode it had before is restored
    seeds = {episode_reset_seed(s, t, e) for s in (0, 1) for t in TWO_TASKS for e in range(3)}
    assert len(seeds) == 12 and episode_reset_seed(0, "push-v3", 1) == episode_reset_seed(0, "push-v3", 1)

    path = plot_success(results, tmp_path / "plots" / "success.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_evaluate_restores_train_mode(model):
    model.train()
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        evaluate(model, tasks=["reach-v3"], episodes_per_task=1, max_steps=3, num_workers=0)
    finally:
        hook.remove()
        model.eval()
    assert seen == [False, False, False]


# ------------------------------------------------------------------------------------------------ policy
def _capture_inputs(model):
    calls = []

    def hook(module, args, kwargs):
        calls.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items() if "prompt" not in k})
        calls[-1]["prompt"] = kwargs.get("prompt")
        calls[-1]["prompt_key_values"] = kwargs.get("prompt_key_values")

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_policy_builds_the_model_inputs_from_the_config():
    """Normalised states, scaled and decremented return-to-go, timesteps, left padding and zero action slots."""
    model = make_model(
        state_mean=[[0.5 * (t + 1)] * 39 for t in range(3)],
        state_std=[[2.0 + t] * 39 for t in range(3)],
        target_returns=[1000.0, 2000.0, 3000.0],
        return_scale=500.0,
    )
    config = model.config
    policy = HarmoDTPolicy(model, cache_prompt=False)  # the raw prompt goes in: checked below
    policy.reset(["pick-place-v3", 0])
    calls, hook = _capture_inputs(model)
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
        policy = HarmoDTPolicy(make_model(**overrides))
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
    calls, hook = _capture_inputs(model)
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
        np.testing.assert_array_equal(alone.act(obs[1][[slot]], reward)[0], subset[[0, 2].index(slot)])
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
    calls, hook = _capture_inputs(model)
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
    calls, hook = _capture_inputs(model)
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
    unprompted = make_model(use_prompt=True)
    unprompted.stored_prompt_attention_mask.zero_()
    with pytest.raises(ValueError, match="no stored prompt"):
        HarmoDTPolicy(unprompted).reset(["reach-v3"])


def test_bad_precision_names_the_allowed_values(model):
    for bad in ("fp16", "bfloat16", torch.bfloat16, None):
        with pytest.raises(ValueError, match=r"precision must be one of \['bf16', 'fp32'\]"):
            evaluate(model, tasks=TWO_TASKS, max_steps=2, num_workers=0, precision=bad)
    with pytest.raises(ValueError, match=r"precision must be one of \['bf16', 'fp32'\], got 'half'"):
        HarmoDTPolicy(model, precision="half")
    with pytest.raises(ValueError, match="precision must be one of"):
        SuccessRateCallback(precision="float32")


def test_evaluate_bad_inputs(model):
    with pytest.raises(ValueError, match="Unknown Meta-World task 'rech-v3'"):
        evaluate(model, tasks=["rech-v3"], num_workers=0)
    with pytest.raises(ValueError, match="not one of this model's 3 tasks"):
        evaluate(model, tasks="mt10", num_workers=0)
    for bad in (0, -1, 51):
        with pytest.raises(ValueError, match="episodes_per_task"):
            evaluate(model, tasks=TWO_TASKS, episodes_per_task=bad, num_workers=0)
    with pytest.raises(ValueError, match="max_steps"):
        evaluate(model, tasks=TWO_TASKS, max_steps=501, num_workers=0)
    with pytest.raises(ValueError, match="max_steps must be <= 100"):  # the tiny model's max_ep_len
        evaluate(model, tasks=TWO_TASKS, max_steps=200, num_workers=0)
    with pytest.raises(ValueError, match="video_dir"):
        evaluate(model, tasks=TWO_TASKS, max_steps=10, video_episodes=1, num_workers=0)
    wrong_dims = HarmoDTModel(tiny_config(state_dim=12, use_prompt=False))
    with pytest.raises(ValueError, match="39-dim observations.*state_dim=12"):
        evaluate(wrong_dims, tasks=TWO_TASKS, max_steps=10, num_workers=0)


# ------------------------------------------------------------------------------------------------ failures
@pytest.mark.parametrize("num_workers", [0, 2])
def test_env_creation_failure_names_task_and_seed(model, num_workers):
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        evaluate(model, tasks=TWO_TASKS, episodes_per_task=2, seed=5, max_steps=10, num_workers=num_workers,
                 env_factory=factory_failing_on_push)  # fmt: skip
    message = str(info.value)
    assert "'push-v3'" in message and "evaluation seed 5" in message
    assert f"env reset seed {episode_reset_seed(5, 'push-v3', 0)}" in message
    assert "simulated MuJoCo failure" in message
    assert time.monotonic() - start < 120


@pytest.mark.slow
@pytest.mark.parametrize(
    "factory, expected",
    [
        (factory_step_raises_on_reach, "simulated simulator blow-up"),
        (factory_worker_dies_on_reach, "died (exit code 3)"),
    ],
)
def test_env_step_failure_or_dead_worker_is_reported_not_hung(model, factory, expected):
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        evaluate(model, tasks=TWO_TASKS, episodes_per_task=2, seed=1, max_steps=10, num_workers=2,
                 env_factory=factory, worker_timeout=60)  # fmt: skip
    message = str(info.value)
    assert expected in message
    assert (
        f"task 'reach-v3' (episode 1, goal 1, evaluation seed 1, env reset seed {episode_reset_seed(1, 'reach-v3', 1)})"
        in message
    )
    assert time.monotonic() - start < 90


# ------------------------------------------------------------------------------------------------ video
@pytest.mark.slow
def test_video_of_chosen_episodes(model, tmp_path):
    import imageio.v2 as imageio

    os.environ.setdefault("MUJOCO_GL", "egl")
    results = evaluate(model, tasks=TWO_TASKS, episodes_per_task=2, max_steps=12, num_workers=0,
                       video_episodes=[1], video_dir=tmp_path / "videos")  # fmt: skip
    files = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert files == ["push-v3_episode01_failure.mp4", "reach-v3_episode01_failure.mp4"]
    assert results["per_task"]["reach-v3"]["videos"] == {"1": str(tmp_path / "videos" / files[1])}
    frames = np.stack(list(imageio.get_reader(tmp_path / "videos" / files[1], format="ffmpeg").iter_data()))
    assert frames.shape[0] == 13 and frames.shape[-1] == 3  # reset frame + 12 steps
    assert frames.std() > 10  # a rendered scene, not a blank image


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_evaluate_cli_writes_results_and_plot(model, tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "training" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("evaluate_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    model.save_pretrained(tmp_path / "model")
    output = tmp_path / "out" / "results.json"
    argv = ["--model", str(tmp_path / "model"), "--tasks", "reach-v3,pick-place-v3", "--episodes", "2",
            "--max-steps", "8", "--seed", "4", "--num-workers", "0", "--output", str(output),
            "--precision", "bf16"]  # fmt: skip
    returned = cli.main(argv)
    saved = json.loads(output.read_text())
    assert saved == json.loads(json.dumps(returned))
    assert saved["tasks"] == ["reach-v3", "pick-place-v3"] and saved["seed"] == 4 and saved["precision"] == "bf16"
    assert saved["model"]["name_or_path"] == str(tmp_path / "model")
    assert all(entry["episode_lengths"] == [8, 8] for entry in saved["per_task"].values())
    assert output.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------ callback
class _RandomSegments(Dataset):
    """Random model-ready training segments of the tiny config (with prompts)."""

    def __init__(self, config, size: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        k, p = config.context_length, config.prompt_length
        self.items = [
            dict(
                states=torch.randn(k, 39, generator=g),
                actions=torch.rand(k, 4, generator=g) * 2 - 1,
                returns_to_go=torch.rand(k, 1, generator=g),
                timesteps=torch.arange(k),
                attention_mask=torch.ones(k, dtype=torch.long),
                task_ids=torch.tensor(i % 2),
                prompt_states=torch.randn(p, 39, generator=g),
                prompt_actions=torch.rand(p, 4, generator=g),
                prompt_returns_to_go=torch.rand(p, 1, generator=g),
                prompt_timesteps=torch.arange(p),
                prompt_attention_mask=torch.ones(p, dtype=torch.long),
            )
            for i in range(size)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _collate(items: list[dict]) -> dict:
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    prompt = {key.removeprefix("prompt_"): batch.pop(key) for key in list(batch) if key.startswith("prompt_")}
    return {**batch, "prompt": prompt, "labels": batch["actions"]}


@pytest.mark.slow
def test_success_rate_callback_with_plain_trainer(tmp_path):
    model = make_model()
    model.train()
    callback = SuccessRateCallback(eval_tasks=["reach-v3"], eval_episodes=1, eval_steps=2, max_steps=8, num_workers=0)
    modes = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: modes.append(module.training), with_kwargs=True)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=_RandomSegments(model.config), data_collator=_collate,
        callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    hook.remove()
    assert [r["step"] for r in callback.history] == [2, 4, 5]  # every 2 steps, and at the end
    logged = [entry for entry in trainer.state.log_history if "eval/mean_success_rate" in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 5]
    assert all("eval/success/reach-v3" in entry and "eval/best_step" in entry for entry in logged)
    assert any("loss" in entry for entry in trainer.state.log_history)  # training itself was logged as usual
    # training forwards in train mode, the 8 evaluation forwards in eval mode, then back to train mode
    assert modes.count(False) == 3 * 8 and modes.count(True) == 5 and model.training
    saved = json.loads((tmp_path / "run" / "eval_history.json").read_text())
    assert saved["last"]["step"] == 5 and saved["best"] == callback.best and len(saved["history"]) == 3
    assert saved["best"]["mean_success_rate"] == max(r["mean_success_rate"] for r in callback.history)
    restored = SuccessRateCallback.from_state(callback.state())
    assert restored.best == callback.best and restored.eval_steps == 2


def test_success_rate_callback_does_nothing_off_rank_zero(tmp_path):
    from transformers import TrainerControl, TrainerState

    callback = SuccessRateCallback(eval_tasks=["reach-v3"], eval_episodes=1, eval_steps=1, num_workers=0)
    state = TrainerState(global_step=1, is_world_process_zero=False)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    model = make_model()
    calls, hook = _capture_inputs(model)
    callback.on_step_end(args, state, TrainerControl(), model=model)
    callback.on_train_end(args, state, TrainerControl(), model=model)
    hook.remove()
    assert calls == [] and callback.history == [] and not (tmp_path / "eval_history.json").exists()
    with pytest.raises(ValueError, match="eval_steps"):
        SuccessRateCallback(eval_steps=0)
