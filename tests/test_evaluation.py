"""HarmoDTPolicy, batched evaluation, crash reporting, plots/videos and SuccessRateCallback on real Meta-World envs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import capture_forward_inputs, small_matmuls_follow_row_count, tiny_config, tiny_prompted_model
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from harmodt_hf import HarmoDTModel
from harmodt_hf.envs import make_env
from harmodt_hf.evaluation.rollouts import HarmoDTPolicy, episode_reset_seed, evaluate, plot_success
from harmodt_hf.training.eval_callback import SuccessRateCallback

logging.disable_progress_bar()
TWO_TASKS = ["reach-v3", "push-v3"]


def row_count_drift(precision: str = "fp32") -> float:
    """Tolerance for actions of one episode computed in batches of different sizes: 0 where small one-thread matmuls
    do not depend on the row count (AMX Xeon); else fp32 rounding carried by the simulator over tens of steps (max
    8.2e-5 over 40 steps measured on an AVX2 EPYC), or for bf16 a last-bit difference that flips a bf16 rounding."""
    if not small_matmuls_follow_row_count():
        return 0.0
    return 1e-3 if precision == "fp32" else 3e-2


@pytest.fixture(scope="module")
def model() -> HarmoDTModel:
    return tiny_prompted_model()


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
        self.env, self.at, self.steps, self.unwrapped = env, at, 0, env.unwrapped

    def render(self):
        return self.env.render()

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
@pytest.mark.slow
def test_batched_evaluation_matches_one_episode_at_a_time(model, one_torch_thread):
    """All 4 episodes batched (2 tasks x 2 goals, env workers, pipelined) give the same actions as batch-1
    episodes: bit for bit where small one-thread matmuls do not depend on the row count, else up to the float
    rounding the simulator carries through 40 steps (max 8.2e-5 measured on an AVX2 EPYC)."""
    drift = 1e-3 if small_matmuls_follow_row_count() else 0.0
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
            np.testing.assert_allclose(batched, reference, rtol=0, atol=drift)
            np.testing.assert_allclose(batched[0], reference[0], rtol=0, atol=drift and 1e-6)  # same first step
            assert entry["successes"][e] == success
            assert entry["returns"][e] == pytest.approx(total, rel=drift or 1e-12)
            assert entry["episode_lengths"][e] == max_steps
            episodes.append(batched)
    # The comparison is not vacuous: actions move within an episode and differ between episodes.
    assert all(ep.std(axis=0).min() > 1e-3 for ep in episodes)
    assert np.abs(episodes[0] - episodes[1]).max() > 1e-3
    assert np.abs(episodes[0] - episodes[2]).max() > 1e-3


def test_bf16_batched_evaluation_matches_one_episode_at_a_time_and_keeps_the_protocol(model, one_torch_thread):
    """precision="bf16": batched episodes equal batch-1 bf16 episodes (bit for bit where the kernels ignore the row
    count, else within row_count_drift), differ from fp32 ones by bf16 rounding, and the run has the same episodes,
    seeds and result keys as an fp32 run (plus the precision)."""
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
            drift = row_count_drift("bf16")  # batch 4 against batch 1: the same kernels are not guaranteed
            np.testing.assert_allclose(batched, reference, rtol=0, atol=drift)
            assert b["successes"][e] == success and b["returns"][e] == pytest.approx(total, rel=drift or 1e-12)
            # Same first observation: the first actions differ by bf16 rounding only (and do differ: bf16 was used).
            first = np.abs(batched[0] - np.array(f["actions"][e][0], dtype=np.float32)).max()
            assert 0 < first < 0.05


def test_stop_on_success_ends_episodes_and_keeps_others_exact(model):
    """Push episodes end at their (forced) first success; reach episodes go on with unchanged actions (within
    row_count_drift: the batch shrinks)."""
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
    drift = row_count_drift()  # from step 6 the stopped run acts on 3, then 2 rows, the full run on 4
    for e in range(2):  # shrinking the batch leaves the remaining episodes' actions untouched (up to that rounding)
        full_reach, full_push = (full["per_task"][task]["actions"][e] for task in ("reach-v3", "push-v3"))
        np.testing.assert_allclose(reach["actions"][e], full_reach, rtol=0, atol=drift)
        np.testing.assert_allclose(push["actions"][e], full_push[: 5 + e], rtol=0, atol=drift)


@pytest.mark.slow
def test_pipelined_evaluation_gives_the_same_results(model, one_torch_thread):
    """With two env workers the policy acts for one wave of episodes while the other wave's envs step (the default);
    results equal the unpipelined run's (actions and returns within row_count_drift), including episodes that end
    early (push succeeds at its 5th/6th step)."""
    kwargs = dict(tasks=TWO_TASKS, episodes_per_task=2, seed=1, max_steps=15, num_workers=2, record_actions=True,
                  env_factory=factory_push_succeeds_at_step_5, torch_threads=1)  # fmt: skip
    piped = evaluate(model, **kwargs)
    plain = evaluate(model, pipeline=False, **kwargs)
    assert piped["pipeline"] is True and plain["pipeline"] is False
    assert piped["per_task"]["push-v3"]["episode_lengths"] == [5, 6]
    assert piped["per_task"]["reach-v3"]["episode_lengths"] == [15, 15]
    drift = row_count_drift()  # waves of 2 episodes against one batch of 4: the same kernels are not guaranteed
    for task in TWO_TASKS:
        for key in ("successes", "episode_lengths"):
            assert piped["per_task"][task][key] == plain["per_task"][task][key], (task, key)
        np.testing.assert_allclose(piped["per_task"][task]["returns"], plain["per_task"][task]["returns"],
                                   rtol=drift or 1e-12)  # fmt: skip
        for e in range(2):
            np.testing.assert_allclose(piped["per_task"][task]["actions"][e], plain["per_task"][task]["actions"][e],
                                       rtol=0, atol=drift)  # fmt: skip


def test_results_are_json_and_describe_the_run(model, tmp_path):
    model.config._name_or_path = "someone/harmodt-tiny"
    results = evaluate(model, tasks="reach-v3,push-v3", episodes_per_task=2, seed=7, max_steps=10, num_workers=0)
    again = json.loads(json.dumps(results))
    assert again == results
    assert results["tasks"] == TWO_TASKS and results["seed"] == 7 and results["episodes_per_task"] == 2
    assert results["stop_on_success"] is True and results["max_steps"] == 10
    assert 0 < results["env_setup_s"] < results["wall_time_s"] and results["pipeline"] is False  # in-process envs
    parts = results["env_setup_s"] + results["policy_s"] + results["env_wait_s"]
    assert results["policy_s"] > 0 and results["env_wait_s"] > 0 and parts < results["wall_time_s"]
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


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_videos_of_episodes_that_end_early_are_reported(model, tmp_path, num_workers):
    """Push episode e succeeds (and stops) at step 5 + e; episodes 0 and 2 share an env worker (or the process), so
    episode 0's environment is closed while episode 2 runs on: every video is in the results."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    results = evaluate(model, tasks=["push-v3"], episodes_per_task=3, max_steps=8, num_workers=num_workers,
                       env_factory=factory_push_succeeds_at_step_5, video_episodes=3, video_dir=tmp_path,
                       video_format="gif")  # fmt: skip
    push = results["per_task"]["push-v3"]
    assert push["episode_lengths"] == [5, 6, 7]
    assert push["videos"] == {str(e): str(tmp_path / f"push-v3_episode0{e}_success.gif") for e in range(3)}
    assert all(Path(path).is_file() for path in push["videos"].values())


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
    # Without --tasks: every task of the model.
    default = cli.main(["--model", str(tmp_path / "model"), "--episodes", "1", "--max-steps", "3", "--num-workers",
                        "0", "--output", str(tmp_path / "all.json"), "--plot", "none"])  # fmt: skip
    assert default["tasks"] == list(model.config.task_names) and len(default["tasks"]) > 2


def test_evaluate_cli_checks_its_outputs_before_the_work(model, tmp_path, monkeypatch):
    """An --output that is a folder (or a --video that is a file) is refused before the model is even loaded."""
    from harmodt_hf.evaluation import cli

    model.save_pretrained(tmp_path / "model")
    taken = tmp_path / "taken"
    taken.mkdir()
    (tmp_path / "a-file").write_text("")

    def refuse(*args, **kwargs):
        raise AssertionError("the evaluation ran although its output cannot be written")

    monkeypatch.setattr(cli, "evaluate", refuse)
    base = ["--model", str(tmp_path / "model"), "--episodes", "1", "--max-steps", "2", "--num-workers", "0"]
    with pytest.raises(ValueError, match=r"--output .*taken is a folder: pass a file path"):
        cli.main([*base, "--output", str(taken)])
    with pytest.raises(ValueError, match=r"--plot .*taken is a folder"):
        cli.main([*base, "--output", str(tmp_path / "r.json"), "--plot", str(taken)])
    with pytest.raises(ValueError, match=r"--video .*a-file is a file"):
        cli.main([*base, "--output", str(tmp_path / "r.json"), "--video", str(tmp_path / "a-file")])
    with pytest.raises(ValueError, match=r"cannot create its folder"):
        cli.main([*base, "--output", str(tmp_path / "a-file" / "r.json")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "model", "taken"]


def test_mp4_without_the_video_extra_is_a_clear_error_before_any_environment(model, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if harmodt-hf[video] were not installed
    with pytest.raises(RuntimeError, match=r"pip install 'harmodt-hf\[video\]'"):
        evaluate(model, tasks=["reach-v3"], episodes_per_task=1, max_steps=5, video_episodes=1, video_dir=tmp_path,
                 num_workers=0, env_factory=_refuse_env)  # fmt: skip
    assert not list(tmp_path.iterdir())


def _refuse_env(*args):
    raise AssertionError("an environment was built")


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
    model = tiny_prompted_model()
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
    model = tiny_prompted_model()
    calls, hook = capture_forward_inputs(model)
    callback.on_step_end(args, state, TrainerControl(), model=model)
    callback.on_train_end(args, state, TrainerControl(), model=model)
    hook.remove()
    assert calls == [] and callback.history == [] and not (tmp_path / "eval_history.json").exists()
    with pytest.raises(ValueError, match="eval_steps"):
        SuccessRateCallback(eval_steps=0)
