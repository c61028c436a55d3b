"""Episode data is checked where it is read (issue #18): bad shards are named by the loader, the statistics and the
Hub push; a folder left by a stopped generator says how to resume it; the generator shards over a launcher only
when asked. On copies of a real generated dataset."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import GENERATED_TASKS

from harmodt_hf.data.card import check_finite_stats, finalize_dataset
from harmodt_hf.data.cli import generate_main
from harmodt_hf.data.loading import load_metaworld_dataset
from harmodt_hf.data.validation import EpisodeDataError
from harmodt_hf.hub.push import push_dataset

SHARD = Path("data") / "reach-v3" / "second-half.parquet"


def _copy(generated_dataset: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "dataset"
    shutil.copytree(generated_dataset, folder)
    return folder


def _rewrite(path: Path, change) -> None:
    table = pq.read_table(path)
    rows = table.to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def _zero_steps(rows: list[dict]) -> None:
    for key in ("observations", "actions", "rewards", "terminations", "truncations", "success"):
        rows[1][key] = []


def _nan_observation(rows: list[dict]) -> None:
    rows[0]["observations"][3][5] = float("nan")


def _corrupt(path: Path, kind: str) -> None:
    if kind == "missing column":
        pq.write_table(pq.read_table(path).drop_columns(["actions"]), path)
    elif kind == "zero-step episode":
        _rewrite(path, _zero_steps)
    elif kind == "nan observation":
        _rewrite(path, _nan_observation)
    else:  # an interrupted copy
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "missing column": r"missing column 'actions'",
    "zero-step episode": r"row 1 \(reach-v3 episode 3\) has no step",
    "nan observation": r"row 0 \(reach-v3 episode 2\): non-finite values \(NaN or inf\) in 'observations'",
    "truncated shard": r"not a readable parquet file.*truncated",
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_bad_shard_is_named_by_the_loader_the_statistics_and_the_push(generated_dataset, tmp_path, hub_server, kind):
    folder = _copy(generated_dataset, tmp_path)
    stats_before = (folder / "stats.json").read_bytes()
    _corrupt(folder / SHARD, kind)
    message = f"{folder / SHARD}.*{CORRUPTIONS[kind]}"
    with pytest.raises(ValueError, match=message):
        load_metaworld_dataset(folder, "all-near-optimal")
    with pytest.raises(ValueError, match=message):
        finalize_dataset(folder)
    assert (folder / "stats.json").read_bytes() == stats_before  # nothing written from the bad shard
    repos = hub_server.repo_ids("dataset")
    with pytest.raises(ValueError, match=message):
        push_dataset(folder, "test-user/bad-shard")
    assert hub_server.repo_ids("dataset") == repos
    # The sub-optimal configs do not read that shard: they still load.
    assert load_metaworld_dataset(folder, "all-sub-optimal").num_rows == 2 * len(GENERATED_TASKS)


def test_non_finite_statistics_are_never_written():
    stats = {"generation": {"noise": float("nan")}, "tasks": {"reach-v3": {"near-optimal": {"state_std": [1.0]}}}}
    check_finite_stats(stats)  # a NaN in the settings ("unknown") is fine
    stats["tasks"]["reach-v3"]["near-optimal"]["state_std"] = [1.0, float("inf")]
    with pytest.raises(EpisodeDataError, match=r"tasks\.reach-v3\.near-optimal\.state_std"):
        check_finite_stats(stats)


def test_a_stopped_generation_says_how_to_resume_and_that_command_finishes_it(generated_dataset, tmp_path, capsys):
    folder = _copy(generated_dataset, tmp_path)
    # What a generator killed after its first task leaves: shards of complete tasks, no card, no stats.
    for name in ("README.md", "stats.json"):
        (folder / name).unlink()
    shutil.rmtree(folder / "images")
    (folder / "data" / "reach-v3" / "second-half.parquet").unlink()
    with pytest.raises(ValueError, match=r"partly written dataset folder \(2 of 3 tasks complete") as raised:
        load_metaworld_dataset(folder, "all-near-optimal")
    with pytest.raises(ValueError, match="partly written dataset folder"):
        push_dataset(folder, "test-user/partial")
    command = str(raised.value).split("Resume it with: ", 1)[1].split(" (with the", 1)[0]
    argv = shlex.split(command)
    assert argv[0] == "harmodt-generate-data"
    assert generate_main([*argv[1:], "--no-progress"]) == 0
    capsys.readouterr()
    ds = load_metaworld_dataset(folder, "all-near-optimal")
    assert sorted(set(ds["task_name"])) == sorted(GENERATED_TASKS) and ds.num_rows == 4 * len(GENERATED_TASKS)
    assert json.loads((folder / "stats.json").read_text())["tasks"].keys() == set(GENERATED_TASKS)


def test_the_generator_shards_over_a_launcher_only_when_asked(tmp_path, monkeypatch, capsys):
    tasks = "reach-v3,push-v3"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    plain = tmp_path / "plain"
    assert generate_main(["--tasks", tasks, "--episodes-per-task", "2", "--output", str(plain), "--no-progress"]) == 0
    assert "RANK=1, WORLD_SIZE=2 ignored; pass --shard-from-env" in capsys.readouterr().err
    assert sorted(p.name for p in (plain / "data").iterdir()) == ["push-v3", "reach-v3"]

    launched = tmp_path / "launched"
    argv = ["--tasks", tasks, "--episodes-per-task", "2", "--output", str(launched), "--no-progress"]
    assert generate_main([*argv, "--shard-from-env"]) == 0
    assert "shard 2/2 from RANK=1, WORLD_SIZE=2" in capsys.readouterr().err
    assert [p.name for p in (launched / "data").iterdir()] == ["push-v3"]  # canonical order: reach, push
    for half in ("first-half", "second-half"):  # the same episodes as the unsharded run's
        shard = Path("data") / "push-v3" / f"{half}.parquet"
        assert pq.read_table(launched / shard).equals(pq.read_table(plain / shard))
