"""The on-disk goal-list cache: the goals of MT1, built once per machine, rebuilt when unreadable."""

from __future__ import annotations

import pickle

import metaworld
import numpy as np
import pytest

from harmodt_hf.envs import factory as tasks
from harmodt_hf.envs import goal_cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(goal_cache.CACHE_ENV, str(tmp_path / "cache"))
    tasks._benchmark.cache_clear()
    yield tmp_path / "cache"
    tasks._benchmark.cache_clear()


def _refuse_mt1(*args, **kwargs):
    raise AssertionError("MT1 was built although its goals are cached")


def test_goals_are_those_of_mt1_and_read_back_without_building_it(cache_dir, monkeypatch):
    built = list(metaworld.MT1("reach-v3", seed=3).train_tasks)
    first = goal_cache.cached_goals("reach-v3", 3)
    path = goal_cache.goal_file("reach-v3", 3)
    assert first == built and path.is_file() and path.is_relative_to(cache_dir)
    assert "metaworld-" in path.parent.name and "mujoco-" in path.parent.name
    monkeypatch.setattr(metaworld, "MT1", _refuse_mt1)
    assert goal_cache.cached_goals("reach-v3", 3) == built
    # An env from the cached goals starts where one set from MT1's goal does.
    env = tasks.make_env("reach-v3", 7, seed=3)
    reference = metaworld.env_dict.ALL_V3_ENVIRONMENTS["reach-v3"]()
    reference.set_task(built[7])
    np.testing.assert_array_equal(env.reset(seed=11)[0], reference.reset(seed=11)[0])
    assert tasks.goals("reach-v3", seed=3) == built
    with pytest.raises(AssertionError, match="MT1 was built"):
        goal_cache.cached_goals("reach-v3", 4)  # another seed is another goal list


def test_unreadable_cache_file_is_rebuilt(cache_dir):
    path = goal_cache.goal_file("push-v3", 0)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"half a pickle")
    goals = goal_cache.cached_goals("push-v3", 0)
    assert goals == list(metaworld.MT1("push-v3", seed=0).train_tasks)
    assert goal_cache.cached_goals("push-v3", 0) == goals  # the file was replaced by a readable one
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    path.write_bytes(pickle.dumps({"not": "goals"}))  # readable, but not a goal list of this task
    assert goal_cache.cached_goals("push-v3", 0) == goals
    assert pickle.loads(path.read_bytes()) == goals


def test_unwritable_cache_warns_and_still_gives_the_goals(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(goal_cache.CACHE_ENV, str(blocker / "cache"))
    goals = goal_cache.cached_goals("reach-v3", 0)
    assert len(goals) == 50
    assert goal_cache.CACHE_ENV in caplog.text and "Could not store the goal list" in caplog.text
