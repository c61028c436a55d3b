"""make_env compiles each task's MuJoCo model once per process; every environment still simulates as a fresh one."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest

from harmodt_hf.envs import compiled_models
from harmodt_hf.envs.factory import make_env, task_goals


@pytest.fixture
def compile_calls(monkeypatch):
    """Count real compiles: the reuse block wraps whatever ``from_xml_path`` is in place when it is entered."""
    compiled_models.clear_compiled_models()
    calls = []
    real = mujoco.MjModel.from_xml_path

    def counting(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(mujoco.MjModel, "from_xml_path", staticmethod(counting))
    yield calls
    compiled_models.clear_compiled_models()


def _fresh_env(task: str, goal_index: int):
    """The environment as Meta-World builds it, its model compiled from the XML file."""
    bench = task_goals(task, 0)
    env = bench.env_class()
    env.set_task(bench.goals[goal_index])
    return env


def _episode(env, seed: int, steps: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    rows = [obs]
    for _ in range(steps):
        obs, reward, _, _, info = env.step(rng.uniform(-1, 1, 4))
        rows.append(np.concatenate([obs, [reward, info["success"]]]))
    return np.concatenate(rows)


@pytest.mark.parametrize("task", ["pick-place-v3", "door-open-v3"])
def test_environments_from_a_reused_model_simulate_as_freshly_compiled_ones(task, compile_calls):
    task_goals(task, 0)  # the goal list (its first build compiles models of its own)
    compile_calls.clear()
    reused = [make_env(task, goal, 0) for goal in (0, 1, 2)]
    assert len(compile_calls) == 1  # one compile for three environments
    for goal, env in zip((0, 1, 2), reused, strict=True):
        np.testing.assert_array_equal(_episode(env, seed=goal, steps=60), _episode(_fresh_env(task, goal), goal, 60))
    assert mujoco.MjModel.from_xml_path.__name__ == "counting"  # the compiler is put back after each build


def test_each_environment_owns_its_model(compile_calls):
    task_goals("reach-v3", 0)
    compile_calls.clear()
    first, second = make_env("reach-v3", 0, 0), make_env("reach-v3", 1, 0)
    assert first.model is not second.model
    before = second.model.body_pos.copy()
    first.model.body_pos[:] += 1.0  # Meta-World moves bodies on reset: one environment's change stays its own
    np.testing.assert_array_equal(second.model.body_pos, before)
    np.testing.assert_array_equal(make_env("reach-v3", 2, 0).model.body_pos, before)
    assert len(compile_calls) == 1
