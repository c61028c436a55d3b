"""Hub publishing (harmodt_hf.hub.push, the push CLIs) against the loopback Hub, with the real clients reading back."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import uuid
from pathlib import Path

import hub_server as hub_server_module
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import tiny_config

from harmodt_hf.data.folder import episodes_to_table
from harmodt_hf.hub.push import HubAuthError, HubPushError, card_links, push_dataset, push_model
from harmodt_hf.tasks import MT50

ROOT = Path(__file__).resolve().parents[1]
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8cf")


def _unique(prefix: str) -> str:
    return f"test-user/{prefix}-{uuid.uuid4().hex[:8]}"


def _snapshot(server) -> tuple:
    """What an upload would change on the server."""
    return server.repo_ids("model"), server.repo_ids("dataset"), server.stored_objects(), server.request_count


def _load_script(relpath: str):
    spec = importlib.util.spec_from_file_location(Path(relpath).stem, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -------------------------------------------------------------------------------------------------------------- data
def _episodes(task: str, n: int) -> pa.Table:
    """``n`` short episodes of ``task`` in the episode format (what the generator writes)."""
    rng = np.random.default_rng(MT50.index(task))
    episodes = [
        dict(
            observations=rng.normal(size=(2 + i, 39)).astype(np.float32),
            actions=rng.uniform(-1, 1, size=(2 + i, 4)).astype(np.float32),
            rewards=np.arange(2 + i, dtype=np.float32),
            terminations=np.zeros(2 + i, bool),
            truncations=np.eye(2 + i, dtype=bool)[-1],
            success=np.arange(2 + i) % 2 == 1,
            task_name=task,
            task_id=MT50.index(task),
            episode_index=i,
            noise_level=0.0,
            goal_index=i,
        )
        for i in range(n)
    ]
    return episodes_to_table(episodes)


DATASET_CARD = """---
license: mit
configs:
- config_name: a
  data_files:
  - split: train
    path: data/a/*.parquet
- config_name: b
  data_files:
  - split: train
    path: data/b/*.parquet
---
# Tiny episodes

![returns](images/returns.png) and per-task [stats](stats.json).
"""


def _dataset_folder(root: Path, card: str = DATASET_CARD) -> tuple[Path, dict[str, list[dict]]]:
    rows = {}
    for name, task, n in (("a", "reach-v3", 5), ("b", "push-v3", 3)):
        (root / "data" / name).mkdir(parents=True)
        table = _episodes(task, n)
        pq.write_table(table, root / "data" / name / "train-00000.parquet")
        rows[name] = table.to_pylist()
    (root / "images").mkdir()
    (root / "images" / "returns.png").write_bytes(PNG)
    (root / "stats.json").write_text('{"reach-v3": {}, "push-v3": {}}')
    (root / "README.md").write_text(card)
    return root, rows


def test_push_dataset_then_load_dataset(hub_server, tmp_path):
    import datasets

    folder, rows = _dataset_folder(tmp_path / "ds")
    repo_id = _unique("episodes")
    commit = push_dataset(folder, repo_id, commit_message="tiny episodes")
    assert commit.oid and f"/datasets/{repo_id}/commit/" in commit
    assert set(hub_server.list_files(repo_id, "dataset")) >= {
        "README.md",
        "stats.json",
        "images/returns.png",
        "data/a/train-00000.parquet",
        "data/b/train-00000.parquet",
    }
    for config in ("a", "b"):
        loaded = datasets.load_dataset(repo_id, config, split="train")
        assert loaded.to_list() == rows[config], f"config {config} differs"
    assert not hub_server.unhandled


def test_push_dataset_cli_private_branch(hub_server, tmp_path):
    from huggingface_hub import HfApi

    folder, rows = _dataset_folder(tmp_path / "ds")
    repo_id = _unique("episodes-cli")
    # A fresh process: the environment the fixture set (HF_ENDPOINT, HF_TOKEN, ...) is enough when read at import.
    args = [str(folder), repo_id, "--private", "--revision", "dev", "--message", "from the CLI"]
    result = subprocess.run(
        [sys.executable, "dataset_scripts/push_dataset.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"/datasets/{repo_id}/commit/" in result.stdout
    api = HfApi()
    assert api.dataset_info(repo_id).private is True
    assert "data/b/train-00000.parquet" in hub_server.list_files(repo_id, "dataset", revision="dev")
    assert "data/b/train-00000.parquet" not in hub_server.list_files(repo_id, "dataset", revision="main")
    assert api.list_repo_commits(repo_id, repo_type="dataset", revision="dev")[0].title == "from the CLI"


def test_a_large_dataset_goes_up_with_upload_large_folder_where_huggingface_hub_has_it(hub_server, tmp_path):
    """Over ``large_folder_bytes``: ``upload_large_folder`` (huggingface_hub 1.x); 2.x has only ``upload_folder``,
    which itself splits large folders into several commits and resumes."""
    import datasets
    from huggingface_hub import HfApi

    folder, rows = _dataset_folder(tmp_path / "ds")
    repo_id = _unique("large")
    commit = push_dataset(folder, repo_id, large_folder_bytes=0, commit_message="one commit")
    titles = [c.title for c in HfApi().list_repo_commits(repo_id, repo_type="dataset")]
    assert commit.oid == HfApi().dataset_info(repo_id).sha
    if hasattr(HfApi, "upload_large_folder"):
        assert "one commit" not in titles and (folder / ".cache" / "huggingface").is_dir()  # its resume state
    else:
        assert titles[0] == "one commit"
    assert not any(p.startswith(".cache") for p in hub_server.list_files(repo_id, "dataset"))
    for config in ("a", "b"):
        assert datasets.load_dataset(repo_id, config, split="train").to_list() == rows[config]


# -------------------------------------------------------------------------------------------------------------- models
def _tiny_gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    return GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).eval()


MODEL_CARD = "---\nlicense: mit\nlibrary_name: transformers\n---\n# Tiny GPT-2\n\n![loss](figures/loss.png)\n"


def test_push_model_folder_then_from_pretrained(hub_server, tmp_path):
    from transformers import AutoModel

    model, folder = _tiny_gpt2(), tmp_path / "gpt2"
    model.save_pretrained(folder)
    (folder / "figures").mkdir()
    (folder / "figures" / "loss.png").write_bytes(PNG)
    (folder / "README.md").write_text(MODEL_CARD)
    repo_id = _unique("gpt2")
    commit = push_model(folder, repo_id)
    assert commit.oid in commit

    loaded = AutoModel.from_pretrained(repo_id)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, model(ids).last_hidden_state, rtol=0, atol=0)
    assert hub_server.read_file(repo_id, "figures/loss.png") == PNG
    assert not hub_server.unhandled


def test_push_model_object_with_card_cli_and_revision(hub_server, tmp_path):
    from transformers import AutoModel

    model = _tiny_gpt2()
    repo_id = _unique("gpt2-obj")
    push_model(model, repo_id, card="---\nlicense: mit\n---\n# Tiny\n", private=True, revision="v1")
    loaded = AutoModel.from_pretrained(repo_id, revision="v1")
    ids = torch.arange(6).view(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, model(ids).last_hidden_state, rtol=0, atol=0)
    assert "model.safetensors" not in hub_server.list_files(repo_id)  # main untouched

    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    (folder / "README.md").write_text("# Tiny\n")
    cli = _load_script("training/push_model.py")
    assert cli.main([str(folder), repo_id, "--message", "main weights"]) == 0
    assert "model.safetensors" in hub_server.list_files(repo_id)


def test_push_harmodt_model(hub_server):
    from helpers import random_inputs

    from harmodt_hf import HarmoDTConfig, HarmoDTModel

    torch.manual_seed(0)
    config = HarmoDTConfig(task_names=["reach-v3", "push-v3"], n_layer=1, hidden_size=32, n_head=2, n_inner=64)
    model = HarmoDTModel(config).eval()
    repo_id = _unique("harmodt")
    push_model(model, repo_id, card="---\nlicense: mit\nlibrary_name: transformers\n---\n# HarmoDT (tiny)\n")
    loaded = HarmoDTModel.from_pretrained(repo_id)
    inputs = random_inputs(config, [0, 1, 1])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).action_preds, model(**inputs).action_preds, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------------------- errors
@pytest.fixture
def model_folder(tmp_path) -> Path:
    folder = tmp_path / "model"
    _tiny_gpt2().save_pretrained(folder)
    (folder / "README.md").write_text("# Card\n")
    return folder


@pytest.mark.parametrize("missing, message", [("model.safetensors", "weights"), ("README.md", "README.md")])
def test_incomplete_model_folder_uploads_nothing(hub_server, model_folder, missing, message):
    (model_folder / missing).unlink()
    before = _snapshot(hub_server)
    with pytest.raises(FileNotFoundError, match=message):
        push_model(model_folder, _unique("incomplete"))
    assert _snapshot(hub_server) == before  # not even a request


def test_incomplete_dataset_folder_uploads_nothing(hub_server, tmp_path):
    folder, _ = _dataset_folder(tmp_path / "ds")
    before = _snapshot(hub_server)
    bad_config = DATASET_CARD.replace("data/b/*.parquet", "data/c/*.parquet")
    (folder / "README.md").write_text(bad_config)
    with pytest.raises(FileNotFoundError, match="data/c"):
        push_dataset(folder, _unique("bad-config"))
    for parquet in folder.rglob("*.parquet"):
        parquet.unlink()
    with pytest.raises(FileNotFoundError, match="parquet"):
        push_dataset(folder, _unique("no-parquet"))
    assert _snapshot(hub_server) == before


@pytest.mark.parametrize("repo_id", ["test-user/bad name!", "test-user/a/b", "test-user/x--y", "", "test-user/.hidden"])
def test_illegal_repo_id(hub_server, model_folder, repo_id):
    before = _snapshot(hub_server)
    with pytest.raises(ValueError, match="Invalid repo id"):
        push_model(model_folder, repo_id)
    assert _snapshot(hub_server) == before


def test_card_linking_missing_figure_fails_before_upload(hub_server, model_folder, tmp_path):
    (model_folder / "README.md").write_text("# Card\n\n![curve](figures/curve.png)\n<img src='figures/b.png'>\n")
    before = _snapshot(hub_server)
    with pytest.raises(FileNotFoundError, match=r"figures/curve\.png.*figures/b\.png"):
        push_model(model_folder, _unique("missing-figure"))
    folder, _ = _dataset_folder(tmp_path / "ds")
    (folder / "images" / "returns.png").unlink()
    with pytest.raises(FileNotFoundError, match="images/returns.png"):
        push_dataset(folder, _unique("missing-figure"))
    (model_folder / "README.md").write_text("# Card\n\n[secret](../outside.txt)\n")
    with pytest.raises(ValueError, match="outside"):
        push_model(model_folder, _unique("escape"))
    assert _snapshot(hub_server) == before


def test_missing_or_wrong_token(hub_server, model_folder, monkeypatch):
    monkeypatch.setattr(hub_server, "auth_required", True)
    monkeypatch.delenv("HF_TOKEN")
    before = _snapshot(hub_server)
    with pytest.raises(HubAuthError, match="HF_TOKEN.*huggingface-cli login"):
        push_model(model_folder, _unique("no-token"))
    assert _snapshot(hub_server) == before
    with pytest.raises(HubAuthError, match="rejected the token"):
        push_model(model_folder, _unique("bad-token"), token="hf_wrong")
    models, datasets_, objects, _ = before
    assert _snapshot(hub_server)[:3] == (models, datasets_, objects)
    # the server itself refuses anonymous reads in this mode
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("test-user/anything", token=False)


def test_half_finished_upload_is_an_error(hub_server, model_folder, monkeypatch):
    """A server that silently drops a file from the commit must not be reported as success."""
    original = hub_server_module._Handler._apply

    def drop_weights(self, line, files, oid):
        if (line.get("value") or {}).get("path") != "model.safetensors":
            original(self, line, files, oid)

    monkeypatch.setattr(hub_server_module._Handler, "_apply", drop_weights)
    with pytest.raises(HubPushError, match=r"incomplete: missing \['model.safetensors'\]"):
        push_model(model_folder, _unique("half"))


def test_card_links():
    card = "---\nlicense: mit\n---\n![a](img/a.png) [b](https://x.org/b.png) [c](#c) `![d](d.png)` [e](./e.md#x)\n"
    assert card_links(card) == ["img/a.png", "e.md"]


def test_loopback_hub_protocol_details(hub_server, tmp_path, monkeypatch):
    """Paths the push tests do not reach: byte ranges, paginated trees, paths-info, private repos, chunked uploads."""
    from huggingface_hub import HfApi, HfFileSystem
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi()
    repo_id = _unique("protocol")
    api.create_repo(repo_id, repo_type="dataset", private=True)
    blob = bytes(range(256)) * 40
    folder = tmp_path / "files"
    (folder / "deep" / "er").mkdir(parents=True)
    (folder / "blob.bin").write_bytes(blob)
    for i in range(5):
        (folder / "deep" / "er" / f"f{i}.txt").write_text(f"file {i}\n")
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=folder)
    with open(folder / "blob.bin", "rb") as f:  # a file object: uploaded with a chunked body
        api.upload_file(path_or_fileobj=f, path_in_repo="again.bin", repo_id=repo_id, repo_type="dataset")

    fs = HfFileSystem()
    with fs.open(f"datasets/{repo_id}/blob.bin", "rb", block_size=100) as f:
        f.seek(1000)
        assert f.read(50) == blob[1000:1050]
    monkeypatch.setattr(hub_server, "tree_page_size", 2)
    files = sorted(e.path for e in api.list_repo_tree(repo_id, repo_type="dataset", recursive=True))
    assert files == sorted(
        ["deep", "deep/er", ".gitattributes", "blob.bin", "again.bin"] + [f"deep/er/f{i}.txt" for i in range(5)]
    )
    info = api.get_paths_info(repo_id, ["deep/er", "blob.bin", "nope"], repo_type="dataset")
    assert [type(e).__name__ for e in info] == ["RepoFolder", "RepoFile"] and info[1].lfs.size == len(blob)
    assert hub_server.read_file(repo_id, "again.bin", "dataset") == blob
    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info(repo_id, token=False)


def test_model_object_card_comes_from_its_folder_or_is_required(hub_server, tmp_path, monkeypatch):
    from transformers import GPT2Model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("# not a model card\n")  # must not be picked up from the working directory
    before = _snapshot(hub_server)
    with pytest.raises(ValueError, match="card"):
        push_model(_tiny_gpt2(), _unique("no-card"))
    assert _snapshot(hub_server) == before

    folder = tmp_path / "saved"
    _tiny_gpt2().save_pretrained(folder)
    (folder / "figures").mkdir()
    (folder / "figures" / "loss.png").write_bytes(PNG)
    (folder / "README.md").write_text(MODEL_CARD)
    repo_id = _unique("from-folder")
    push_model(GPT2Model.from_pretrained(folder), repo_id)
    assert hub_server.read_file(repo_id, "README.md").decode() == MODEL_CARD
    assert hub_server.read_file(repo_id, "figures/loss.png") == PNG


# ---------------------------------------------------------------------------------------------------- nothing silent
def test_push_model_uploads_no_pickle_and_says_so(hub_server, model_folder, caplog):
    """A Trainer output folder holds pickles (training_args.bin as Trainer saves it, optimizer.pt): they stay local."""
    from transformers import TrainingArguments

    torch.save(TrainingArguments(output_dir=str(model_folder), report_to=[]), model_folder / "training_args.bin")
    torch.save({"state": {}}, model_folder / "optimizer.pt")
    repo_id = _unique("no-pickle")
    push_model(model_folder, repo_id)
    remote = set(hub_server.list_files(repo_id))
    assert {"config.json", "model.safetensors", "README.md"} <= remote
    assert not remote & {"training_args.bin", "optimizer.pt"}
    assert "Not uploading optimizer.pt, training_args.bin" in caplog.text and "pickle" in caplog.text


def test_push_model_cli_with_a_bad_repo_id_writes_nothing(hub_server, tmp_path, capsys):
    """A folder without README.md would get a card built first: a bad repo id is found before anything is written."""
    from harmodt_hf import HarmoDTModel
    from harmodt_hf.hub.cli import push_model_main

    folder = tmp_path / "final"
    HarmoDTModel(tiny_config()).save_pretrained(folder)
    results = tmp_path / "results.json"
    results.write_text("{}")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    with pytest.raises(SystemExit):
        push_model_main([str(folder), "test-user/bad name!", "--results", str(results)])
    assert "Invalid repo id" in capsys.readouterr().err
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before


def test_an_unreachable_endpoint_is_a_one_line_error(hub_server, model_folder, monkeypatch, capsys):
    import socket

    import huggingface_hub.constants as hc
    from huggingface_hub import hf_api

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(hc, "ENDPOINT", url)
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    with pytest.raises(HubPushError, match=f"Cannot reach the Hub at {url}"):
        push_model(model_folder, _unique("unreachable"))
    cli = _load_script("training/push_model.py")
    with pytest.raises(SystemExit) as exited:
        cli.main([str(model_folder), _unique("unreachable")])
    err = capsys.readouterr().err
    assert exited.value.code == 1 and err.count("\n") == 1 and f"Cannot reach the Hub at {url}" in err
