"""Conversion of the official `<task>-v2/<i>.npz` layout, on small files written here in that layout."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from harmodt_hf.data.conversion import convert_official_dataset
from harmodt_hf.data.loading import EPISODE_FEATURES, load_metaworld_dataset, load_stats
from harmodt_hf.tasks import MT50

REPO = Path(__file__).resolve().parents[1]
# reach: 6 episodes of 500 steps with `dones` and rewards shaped (T, 1); button-press-topdown: 4 of 30 with `terminals`
LAYOUT = {"reach-v2": (6, 500, "dones"), "button-press-topdown-v2": (4, 30, "terminals")}


def write_official(root: Path, layout=LAYOUT, success: bool = False, seed: int = 0) -> dict:
    """Random episodes in the official layout; returns {v2 name: [episode dicts]}."""
    rng = np.random.default_rng(seed)
    written = {}
    for name, (n, T, done_key) in layout.items():
        (root / name).mkdir(parents=True)
        written[name] = []
        for i in range(n):
            ep = {
                "observations": rng.normal(size=(T, 39)),  # float64, as the official files
                "actions": rng.uniform(-1, 1, size=(T, 4)),
                "rewards": rng.uniform(0, 10, size=(T, 1) if done_key == "dones" else T),
                done_key: np.eye(1, T, T - 1, dtype=bool)[0] if done_key == "dones" else np.zeros(T, bool),
            }
            if success:
                ep["success"] = rng.random(T) < 0.1
            np.savez(root / name / f"{i}.npz", **ep)
            written[name].append(ep)
    return written


@pytest.fixture(scope="module")
def hf_offline(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
        yield


@pytest.fixture(scope="module")
def converted(tmp_path_factory, hf_offline):
    root = tmp_path_factory.mktemp("official")
    source = root / "MT50" / "dataset"
    written = write_official(source)
    out = root / "converted"
    result = convert_official_dataset(source, out, progress=False)
    return source, out, written, result


def test_converted_rows_match_the_npz_files(converted):
    _, out, written, result = converted
    assert result.tasks == ["button-press-topdown-v3", "reach-v3"]  # canonical order, v3 names
    ds = load_metaworld_dataset(out, "all-near-optimal").with_format("numpy")
    assert ds.features == EPISODE_FEATURES and ds.num_rows == 10
    i = 0
    for v2 in ("button-press-topdown-v2", "reach-v2"):
        v3 = v2.replace("-v2", "-v3")
        for e, ep in enumerate(written[v2]):
            row = ds[i]
            i += 1
            assert row["task_name"] == v3 and row["task_id"] == MT50.index(v3) and row["episode_index"] == e
            assert np.isnan(row["noise_level"]) and row["goal_index"] == -1
            np.testing.assert_array_equal(row["observations"], ep["observations"].astype(np.float32))
            np.testing.assert_array_equal(row["actions"], ep["actions"].astype(np.float32))
            np.testing.assert_array_equal(row["rewards"], ep["rewards"].reshape(-1).astype(np.float32))
            assert not row["success"].any()  # not in the source
            T = len(ep["actions"])
            # reach: `dones` at step 500 = the time limit; button-press: no terminal -> truncated at the end
            assert not row["terminations"].any() and row["truncations"][-1] and row["truncations"].sum() == 1
            assert row["observations"].shape == (T, 39)


def test_sub_optimal_is_the_first_half(converted):
    _, out, _, _ = converted
    sub = load_metaworld_dataset(out, "reach-v3-sub-optimal")
    assert sub["episode_index"] == [0, 1, 2]
    sub_all = load_metaworld_dataset(out, "all-sub-optimal")
    assert list(zip(sub_all["task_name"], sub_all["episode_index"], strict=True)) == [
        ("button-press-topdown-v3", 0),
        ("button-press-topdown-v3", 1),
        ("reach-v3", 0),
        ("reach-v3", 1),
        ("reach-v3", 2),
    ]


def test_stats_and_card_mark_success_unknown(converted):
    _, out, written, _ = converted
    stats = load_stats(out)
    entry = stats["tasks"]["reach-v3"]
    assert entry["near-optimal"]["success_rate"] is None and entry["expert"]["num_episodes"] == 0
    obs = np.concatenate([ep["observations"] for ep in written["reach-v2"][:3]]).astype(np.float32)
    np.testing.assert_allclose(entry["sub-optimal"]["state_mean"], obs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(entry["sub-optimal"]["state_std"], obs.std(0), rtol=1e-4, atol=1e-6)
    card = (out / "README.md").read_text()
    assert "Converted from the official" in card and "not in the source data, stored as false" in card
    assert (out / "images" / "returns_histogram.png").is_file()


def test_rerun_skips_complete_shards(converted):
    source, out, _, _ = converted
    before = {p: p.read_bytes() for p in (out / "data").rglob("*.parquet")}
    again = convert_official_dataset(source, out, progress=False)
    assert again.shards_written == [] and len(again.shards_skipped) == 4
    assert all(p.read_bytes() == data for p, data in before.items())  # untouched


def test_success_array_is_kept_and_cli_works(tmp_path, hf_offline, capsys):
    written = write_official(tmp_path / "src", {"drawer-close-v2": (2, 500, "terminals")}, success=True, seed=3)
    spec = importlib.util.spec_from_file_location("convert_official", REPO / "dataset_scripts" / "convert_official.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--source", str(tmp_path / "src"), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == ["drawer-close-v3"]
    ds = load_metaworld_dataset(tmp_path / "out", "drawer-close-v3-near-optimal").with_format("numpy")
    for row, ep in zip(ds, written["drawer-close-v2"], strict=True):
        np.testing.assert_array_equal(row["success"], ep["success"])
    rate = np.mean([ep["success"].any() for ep in written["drawer-close-v2"]])
    assert load_stats(tmp_path / "out")["tasks"]["drawer-close-v3"]["near-optimal"]["success_rate"] == rate


def test_bad_official_folders_are_clear_errors(tmp_path):
    write_official(tmp_path / "typo", {"rech-v2": (2, 10, "dones")})
    with pytest.raises(ValueError, match="Close names: reach-v3"):
        convert_official_dataset(tmp_path / "typo", tmp_path / "out1", progress=False)

    write_official(tmp_path / "hole", {"reach-v2": (3, 10, "dones")})
    (tmp_path / "hole" / "reach-v2" / "1.npz").unlink()
    with pytest.raises(ValueError, match=r"misses episode files \[1\]"):
        convert_official_dataset(tmp_path / "hole", tmp_path / "out2", progress=False)

    keyless = tmp_path / "keyless" / "reach-v2"
    keyless.mkdir(parents=True)
    for i in range(2):
        np.savez(keyless / f"{i}.npz", observations=np.zeros((5, 39)), actions=np.zeros((5, 4)), rewards=np.zeros(5))
    with pytest.raises(ValueError, match="lacks \\['terminals or dones'\\]"):
        convert_official_dataset(tmp_path / "keyless", tmp_path / "out3", progress=False)
    assert not list((tmp_path / "out3").rglob("*.parquet")) and not list((tmp_path / "out3").rglob(".*"))

    write_official(tmp_path / "few", {"reach-v2": (3, 10, "dones")})
    with pytest.raises(ValueError, match="no '<task>-v2' folder"):
        convert_official_dataset(tmp_path / "few", tmp_path / "out4", tasks="mt5", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_official_dataset(tmp_path / "nowhere", tmp_path / "out5", progress=False)
