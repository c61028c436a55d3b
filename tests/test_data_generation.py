"""Meta-World dataset generation: real envs and experts, real parquet read back through `datasets.load_dataset`."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from harmodt_hf.data.folder import write_parquet_atomic
from harmodt_hf.data.generation import NoiseSchedule, generate_dataset
from harmodt_hf.data.loading import (
    EPISODE_FEATURES,
    check_episode_schema,
    load_metaworld_dataset,
    load_stats,
    state_stats,
)
from harmodt_hf.envs import make_env
from harmodt_hf.tasks import MT50

REPO = Path(__file__).resolve().parents[1]
TASKS = ["reach-v3", "button-press-topdown-v3"]  # canonical order: button-press-topdown (2) before reach (27)
N, SEED = 4, 7


@pytest.fixture(scope="module")
def hf_offline(tmp_path_factory):
    """Offline `datasets` with a private cache for this module (env vars for subprocesses, config for this one)."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
        yield home / "datasets"


@pytest.fixture(scope="module")
def generated(tmp_path_factory, hf_offline) -> Path:
    """2 tasks × 4 episodes, one process."""
    folder = tmp_path_factory.mktemp("gen") / "ds"
    generate_dataset(folder, TASKS, N, seed=SEED, num_workers=1, progress=False)
    return folder


def _load(folder: Path, config: str, cache: Path) -> datasets.Dataset:
    return datasets.load_dataset(str(folder), config, split="train", cache_dir=str(cache))


def _tables(folder: Path) -> dict[str, pa.Table]:
    return {str(p.relative_to(folder)): pq.read_table(p) for p in sorted((folder / "data").rglob("*.parquet"))}


def _cli_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def test_loads_with_load_dataset_offline(generated, hf_offline):
    ds = _load(generated, "all-near-optimal", hf_offline)
    assert ds.features == EPISODE_FEATURES
    assert ds.num_rows == len(TASKS) * N
    assert ds["task_name"] == ["button-press-topdown-v3"] * N + ["reach-v3"] * N  # canonical order
    assert ds["task_id"] == [MT50.index("button-press-topdown-v3")] * N + [MT50.index("reach-v3")] * N
    assert ds["episode_index"] == list(range(N)) * 2
    schedule = NoiseSchedule()
    assert ds["noise_level"] == pytest.approx([schedule.level(e, N) for e in range(N)] * 2)
    assert ds["noise_level"][0] == 1.0 and ds["noise_level"][N - 1] == 0.0
    ep = ds.with_format("numpy")[N]
    assert ep["observations"].shape == (500, 39) and ep["observations"].dtype == np.float32
    assert ep["actions"].shape == (500, 4) and ep["actions"].dtype == np.float32
    assert np.abs(ep["actions"]).max() <= 1.0
    for key in ("rewards", "terminations", "truncations", "success"):
        assert ep[key].shape == (500,)
    assert ep["rewards"].dtype == np.float32 and ep["success"].dtype == bool
    assert not ep["terminations"].any() and ep["truncations"][-1] and not ep["truncations"][:-1].any()
    assert 0 <= ep["goal_index"] < 50

    ours = load_metaworld_dataset(generated, "reach-v3-near-optimal")
    assert ours.num_rows == N and set(ours["task_name"]) == {"reach-v3"}

    meta = yaml.safe_load((generated / "README.md").read_text().split("---")[1])
    names = {c["config_name"] for c in meta["configs"]}
    expected = {f"{p}-{q}" for p in ["all", *TASKS] for q in ("near-optimal", "sub-optimal")}
    assert names == expected  # no mt5/mt10 config: those sets are not fully present


def test_sub_optimal_is_exactly_the_first_half(generated, hf_offline):
    near = _load(generated, "all-near-optimal", hf_offline).with_format("numpy")
    sub = _load(generated, "all-sub-optimal", hf_offline).with_format("numpy")
    keep = [i for i, e in enumerate(near["episode_index"]) if e < N // 2]
    assert sub.num_rows == len(keep) == len(TASKS) * N // 2
    for j, i in enumerate(keep):
        a, b = near[i], sub[j]
        assert a["task_name"] == b["task_name"] and a["episode_index"] == b["episode_index"]
        np.testing.assert_array_equal(a["observations"], b["observations"])
        np.testing.assert_array_equal(a["actions"], b["actions"])
    per_task = _load(generated, "reach-v3-sub-optimal", hf_offline)
    assert per_task["episode_index"] == list(range(N // 2))


def test_stats_match_the_data(generated, hf_offline):
    stats = load_stats(generated)
    near = _load(generated, "all-near-optimal", hf_offline).with_format("numpy")
    for task in TASKS:
        for quality, limit in (("near-optimal", N), ("sub-optimal", N // 2)):
            pairs = zip(near["task_name"], near["episode_index"], strict=True)
            rows = [i for i, (t, e) in enumerate(pairs) if t == task and e < limit]
            obs = np.concatenate([near[i]["observations"] for i in rows]).astype(np.float64)
            mean, std = state_stats(stats, task, quality)
            np.testing.assert_allclose(mean, obs.mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(std, obs.std(0), rtol=1e-4, atol=1e-6)  # raw std, no +1e-6
            entry = stats["tasks"][task][quality]
            returns = [float(near[i]["rewards"].sum(dtype=np.float64)) for i in rows]
            assert entry["num_episodes"] == limit and entry["num_steps"] == 500 * limit
            assert entry["return_mean"] == pytest.approx(np.mean(returns), rel=1e-6)
            assert entry["success_rate"] == pytest.approx(np.mean([near[i]["success"].any() for i in rows]))
    with pytest.raises(KeyError, match="tasks present"):
        state_stats(stats, "push-v3")


def test_expert_episodes_succeed_as_often_as_the_bare_expert(generated, hf_offline):
    from metaworld.policies import ENV_POLICY_MAP

    ds = _load(generated, "all-near-optimal", hf_offline).with_format("numpy")
    stats = load_stats(generated)
    card = (generated / "README.md").read_text()
    for task in TASKS:
        rows = [ds[i] for i in range(ds.num_rows) if ds[i]["task_name"] == task and ds[i]["noise_level"] == 0.0]
        assert rows, "the last episodes must be noise-free"
        direct = []
        for row in rows:  # the scripted expert alone, fresh env, same goal
            env, policy = make_env(task, int(row["goal_index"])), ENV_POLICY_MAP[task]()
            obs, _ = env.reset()
            hit = False
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(500):
                    obs, _, _, truncated, info = env.step(policy.get_action(obs))
                    hit |= bool(info["success"])
                    if truncated:
                        break
            direct.append(hit)
        recorded = [bool(r["success"].any()) for r in rows]
        assert np.mean(recorded) >= np.mean(direct)
        expert = stats["tasks"][task]["expert"]
        assert expert["num_episodes"] == len(rows) and expert["success_rate"] == pytest.approx(np.mean(recorded))
        rate = expert["success_rate"]
        assert f"| {task} | {MT50.index(task)} |" in card and f"{rate:.2f} ({len(rows)})" in card


def test_card_has_generation_details_and_histogram(generated):
    card = (generated / "README.md").read_text()
    manifest = json.loads((generated / "generation_config.json").read_text())
    assert manifest["seed"] == SEED and manifest["episodes_per_task"] == N
    assert "metaworld 3.1.1" in card and f"seed {SEED};" in card and "noise of std 0.3·p" in card
    assert f"--episodes-per-task {N} --seed {SEED}" in card
    png = generated / "images" / "returns_histogram.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](images/returns_histogram.png)" in card


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_workers_give_identical_rows(generated, tmp_path):
    other = tmp_path / "two"
    result = generate_dataset(other, list(reversed(TASKS)), N, seed=SEED, num_workers=2, progress=False)
    assert len(result.shards_written) == 4 and result.episodes_generated == len(TASKS) * N
    a, b = _tables(generated), _tables(other)
    assert a.keys() == b.keys() and all(a[k].equals(b[k]) for k in a)
    assert json.loads((generated / "stats.json").read_text()) == json.loads((other / "stats.json").read_text())
    # a different seed gives different data
    third = tmp_path / "seed"
    generate_dataset(third, ["reach-v3"], 2, seed=SEED + 1, progress=False)
    assert not pq.read_table(third / "data/reach-v3/first-half.parquet").equals(
        pq.read_table(generated / "data/reach-v3/first-half.parquet")
    )


@pytest.mark.slow
def test_killed_run_resumes_to_identical_data(generated, tmp_path):
    folder = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "dataset_scripts" / "generate_metaworld.py"), "--tasks", ",".join(TASKS)]
    cmd += ["--episodes-per-task", str(N), "--seed", str(SEED), "--output", str(folder), "--no-progress"]
    proc = subprocess.Popen(cmd, env=_cli_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list((folder / "data").rglob("*.parquet")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    shards = list((folder / "data").rglob("*.parquet"))
    assert 1 <= len(shards) < 4, "the run must have been killed mid-way"
    for shard in shards:  # every visible shard is complete
        assert pq.read_metadata(shard).num_rows == N // 2
    assert not (folder / "stats.json").exists()

    rerun = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert len(report["shards_skipped"]) == len(shards) and len(report["shards_written"]) == 4 - len(shards)
    a, b = _tables(generated), _tables(folder)
    assert a.keys() == b.keys() and all(a[k].equals(b[k]) for k in a)
    assert not [p for p in folder.rglob("*") if p.name.startswith(".")], "temporary files left behind"
    # a complete folder: re-running writes nothing
    again = generate_dataset(folder, TASKS, N, seed=SEED, progress=False)
    assert again.shards_written == [] and len(again.shards_skipped) == 4


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "dataset_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unknown_task_lists_close_names(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="Close names: reach-v3"):
        generate_dataset(out, ["rech-v3"], N)
    code = _script("generate_metaworld").main(["--tasks", "reach-v3,rech-v3", "--output", str(out), "--no-progress"])
    assert code == 2 and "reach-v3" in capsys.readouterr().err
    assert not out.exists()


def test_too_few_episodes_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="episodes_per_task must be an integer >= 2"):
        generate_dataset(tmp_path / "out", ["reach-v3"], 1)
    assert not (tmp_path / "out").exists()


def test_foreign_output_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt.*new or empty folder"):
        generate_dataset(out, ["reach-v3"], 2, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_other_settings_need_overwrite(generated, tmp_path):
    out = tmp_path / "out"
    generate_dataset(out, ["reach-v3"], 2, seed=1, progress=False)
    before = _tables(out)
    with pytest.raises(FileExistsError, match="differs in: seed.*--overwrite"):
        generate_dataset(out, ["reach-v3"], 2, seed=2, progress=False)
    assert all(before[k].equals(v) for k, v in _tables(out).items())
    generate_dataset(out, ["reach-v3"], 2, seed=2, overwrite=True, progress=False)
    assert not _tables(out)["data/reach-v3/first-half.parquet"].equals(before["data/reach-v3/first-half.parquet"])


def test_missing_or_mistyped_column_is_named(generated, tmp_path, hf_offline):
    broken = tmp_path / "broken"
    shutil.copytree(generated, broken)
    table = pq.read_table(generated / "data/reach-v3/first-half.parquet").drop_columns(["success"])
    table = table.set_column(table.schema.get_field_index("task_id"), "task_id", table["task_id"].cast(pa.int32()))
    pq.write_table(table.replace_schema_metadata(None), broken / "data/reach-v3/first-half.parquet")
    with pytest.raises(ValueError) as err:
        load_metaworld_dataset(broken, "reach-v3-sub-optimal", cache_dir=str(hf_offline))
    message = str(err.value)
    assert message.startswith(str(broken / "data/reach-v3/first-half.parquet"))  # the bad file is named
    assert "missing column 'success'" in message and "column 'task_id' has type" in message
    assert "observations: List(List(Value('float32'), length=39))" in message  # the expected format
    with pytest.raises(ValueError, match="Available configs: all-near-optimal"):
        load_metaworld_dataset(generated, "mt5-near-optimal")
    with pytest.raises(ValueError, match="missing column 'observations'"):
        check_episode_schema(datasets.Features({"x": datasets.Value("int64")}))


def test_failed_shard_write_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "data" / "reach-v3" / "first-half.parquet"

    def broken_writer(table, where, **kwargs):
        where.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        write_parquet_atomic(pa.table({"a": [1]}), target)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
