"""The README's main job (harmodt_hf.main_job) in reduced form from a fresh clone, its push to the Hub, and the
README's Python example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from helpers import random_inputs
from huggingface_hub import ModelCard

from harmodt_hf import HarmoDTModel
from harmodt_hf.hub.push import card_links, push_model, validate_model_folder
from harmodt_hf.tasks import MT5

ROOT = Path(__file__).resolve().parents[1]


def _eval_rows(card: ModelCard) -> list[tuple]:
    return [(r.dataset_config, r.metric_type, r.metric_value) for r in card.data.eval_results]


# Runs the driver as `python -m harmodt_hf.main_job` would, but first drops this checkout's editable-install finder:
# it sits on sys.meta_path after PYTHONPATH and would quietly serve any module missing from the clone out of this
# working tree (uncommitted files included). At exit it prints where every harmodt_hf module came from.
DRIVER = """
import importlib.util, json, runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f)]
sys.argv = ["harmodt_hf.main_job", *sys.argv[1:]]
files = {importlib.util.find_spec("harmodt_hf.main_job").origin}
try:
    runpy.run_module("harmodt_hf.main_job", run_name="__main__", alter_sys=True)
finally:
    mods = [m for n, m in list(sys.modules.items()) if n.startswith("harmodt_hf")]
    files |= {m.__file__ for m in mods if getattr(m, "__file__", None)}
    print("HARMODT_MODULES=" + json.dumps(sorted(files)))
"""


@pytest.fixture(scope="module")
def smoke_job(tmp_path_factory) -> dict:
    """`python -m harmodt_hf.main_job --smoke` run in a fresh clone of the committed HEAD, with this venv's python."""
    base = tmp_path_factory.mktemp("main-job")
    clone = base / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    env = {
        **os.environ,
        "PYTHONPATH": str(clone),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(base / "hf-home"),
        "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
    }
    for key in ("HF_ENDPOINT", "HF_DATASETS_CACHE", "HF_HUB_CACHE"):  # set by the loopback Hub fixture, if active
        env.pop(key, None)
    output = base / "out"
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, "--smoke", "--output", str(output)],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    modules = json.loads(result.stdout.rsplit("HARMODT_MODULES=", 1)[1])
    return {"clone": clone, "modules": [Path(m) for m in modules], "output": output, "stdout": result.stdout}


@pytest.mark.slow
def test_smoke_job_from_a_fresh_clone_writes_a_loadable_model_folder(smoke_job):
    clone, output = smoke_job["clone"], smoke_job["output"]
    modules = smoke_job["modules"]
    assert any(m.name == "main_job.py" for m in modules) and any(m.name == "evaluation.py" for m in modules)
    assert all(m.is_relative_to(clone) for m in modules), modules  # the clone's committed code ran, nothing else
    folder = output / "model"
    assert f"Model folder (weights, README.md card, images/, results.json): {folder}" in smoke_job["stdout"]
    assert "Mean success rate on MT5" in smoke_job["stdout"]

    model = HarmoDTModel.from_pretrained(folder)
    assert model.config.task_names == list(MT5)
    assert model.config.mask_mode == "harmony" and model.config.hidden_size == 64

    results = json.loads((folder / "results.json").read_text())
    assert results["tasks"] == list(MT5) and results["episodes_per_task"] == 1
    card = ModelCard.load(folder / "README.md")
    rows = _eval_rows(card)
    for task in MT5:
        assert (task, "success_rate", round(100 * results["per_task"][task]["success_rate"], 2)) in rows
        assert f"| {task} |" in card.text
    assert any(metric == "mean_success_rate" for _, metric, _ in rows)

    uploads = validate_model_folder(folder)
    assert {"images/success_per_task.png", "images/mask_overlap.png", "images/mask_embedding.png"} <= set(uploads)
    assert all(link in uploads for link in card_links(card.content))
    summary = json.loads((folder / "training_summary.json").read_text())
    assert summary["max_steps"] == 12 and summary["variant"] == "harmodt-f"
    job = json.loads((output / "main_job_summary.json").read_text())
    assert set(job["timings_s"]) >= {"generate", "train", "evaluate", "model_folder", "total"}
    assert (output / "data" / "stats.json").is_file()


@pytest.mark.slow
def test_smoke_job_model_folder_round_trips_through_the_hub(smoke_job, hub_server):
    folder = smoke_job["output"] / "model"
    repo_id = f"test-user/main-job-{uuid.uuid4().hex[:8]}"
    push_model(folder, repo_id)
    local = HarmoDTModel.from_pretrained(folder)
    remote = HarmoDTModel.from_pretrained(repo_id)
    inputs = random_inputs(local.config, [4, 0, 2, 2, 1, 3], seed=1)
    with torch.no_grad():
        torch.testing.assert_close(remote(**inputs).action_preds, local(**inputs).action_preds, rtol=0, atol=0)
    for name, mask in local.get_task_masks().items():
        assert torch.equal(remote.get_task_masks()[name], mask)
    remote_card = ModelCard.load(repo_id)
    local_card = ModelCard.load(folder / "README.md")
    assert _eval_rows(remote_card) == _eval_rows(local_card)
    assert {r.dataset_config for r in remote_card.data.eval_results} >= set(MT5)
    assert set(card_links(remote_card.content)) <= set(hub_server.list_files(repo_id))


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python example", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_example(), "README example", "exec"), namespace)
    actions = namespace["actions"]
    assert actions.shape == (2, 4)
    assert abs(actions).max() <= 1.0
    assert not torch.allclose(torch.as_tensor(actions[0]), torch.as_tensor(actions[1]))  # task masks differ
    assert (tmp_path / "my-harmodt" / "model.safetensors").is_file()


def test_main_job_script_and_driver_agree():
    script = (ROOT / "scripts" / "main_job.sh").read_text()
    assert "bash scripts/setup.sh" in script and "python -m harmodt_hf.main_job" in script
    from harmodt_hf.main_job import FULL, SMOKE, TINY_CONFIG, parse_args

    assert TINY_CONFIG.is_file()
    assert SMOKE.episodes_per_task < FULL.episodes_per_task and SMOKE.train_steps < FULL.train_steps
    assert parse_args(["--smoke"]).smoke and parse_args([]).threads == 1
