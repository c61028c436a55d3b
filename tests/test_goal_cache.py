"""The on-disk goal-list cache: the goals of MT1, built once per machine, rebuilt when unreadable, never a pickle."""

from __future__ import annotations

import json
import os
import pickle

import metaworld
import numpy as np
import pytest

from harmodt_hf.envs import factory as tasks
from harmodt_hf.envs import goal_cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(goal_cache.CACHE_ENV, str(tmp_path / "cache"))
    tasks.forget_task_goals()
    yield tmp_path / "cache"
    tasks.forget_task_goals()


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
    content = json.loads(path.read_text())
    path.write_text(json.dumps({**content, "task": "reach-v3"}))  # readable, but not a goal list of this task
    assert goal_cache.cached_goals("push-v3", 0) == goals
    assert json.loads(path.read_text()) == content


class _PlantedCode:
    """Unpickling this creates the file ``marker``: what a planted cache file could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_cache_is_plain_json_and_a_planted_pickle_never_runs(cache_dir, tmp_path):
    built = list(metaworld.MT1("reach-v3", seed=0).train_tasks)
    path = goal_cache.goal_file("reach-v3", 0)
    path.parent.mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    path.write_bytes(pickle.dumps([_PlantedCode(str(marker))]))
    assert goal_cache.cached_goals("reach-v3", 0) == built  # rebuilt from MT1, the planted file replaced
    assert not marker.exists()

    content = json.loads(path.read_text(encoding="utf-8"))  # plain JSON: numbers and flags, no class, no pickle
    assert content["task"] == "reach-v3" and len(content["goals"]) == 50
    first = content["goals"][0]
    assert first["env_cls"] is None and first["partially_observable"] is False
    np.testing.assert_array_equal(first["rand_vec"]["array"], pickle.loads(built[0].data)["rand_vec"])
    # A JSON file naming a class instead of the placeholder is foreign too: the class comes from Meta-World only.
    path.write_text(json.dumps({**content, "goals": [{**g, "env_cls": "os.system"} for g in content["goals"]]}))
    assert goal_cache.cached_goals("reach-v3", 0) == built
    assert json.loads(path.read_text(encoding="utf-8")) == content
