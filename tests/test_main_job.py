"""The package as a user installs it (a wheel of the committed HEAD in a fresh virtual environment: shipped files, every
console script's --help), the README's main job in reduced form from that install, its push to the Hub, and the
README's Python example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
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


CONSOLE_SCRIPTS = (
    "harmodt-train",
    "harmodt-evaluate",
    "harmodt-generate-data",
    "harmodt-convert-official",
    "harmodt-push",
    "harmodt-main-job",
)
# Prints where every harmodt_hf module of the installed package comes from (after importing every module).
WHERE_FROM = """
import importlib, json, pkgutil, harmodt_hf
names = [m.name for m in pkgutil.walk_packages(harmodt_hf.__path__, "harmodt_hf.")]
files = [importlib.import_module(name).__file__ for name in names]
print(json.dumps([harmodt_hf.__file__, *files]))
"""


def _isolated_env(home: Path) -> dict[str, str]:
    """The environment of a user of the installed wheel: no PYTHONPATH (no checkout), offline Hub, own HF_HOME."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(home)}
    env["MUJOCO_GL"] = os.environ.get("MUJOCO_GL", "egl")
    for key in ("PYTHONPATH", "HF_ENDPOINT", "HF_DATASETS_CACHE", "HF_HUB_CACHE", "VIRTUAL_ENV"):
        env.pop(key, None)  # the loopback Hub fixture sets the HF ones, if active
    return env


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> dict:
    """A wheel built from a fresh clone of the committed HEAD, installed alone into a new virtual environment.

    The new environment's dependencies come from this interpreter's site-packages through a ``.pth`` line (a folder
    added that way is not a site folder, so the editable install of the checkout that may live there is not loaded).
    """
    base = tmp_path_factory.mktemp("wheel")
    clone, dist, venv = base / "clone", base / "dist", base / "venv"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(clone)]
    subprocess.run(build, check=True, timeout=300, env=_isolated_env(base / "hf"))
    (wheel,) = dist.glob("harmodt_hf-*.whl")
    venv_python = _make_venv(venv)
    install = [*pip, "--python", str(venv_python), "install", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, timeout=300, env=_isolated_env(base / "hf"))
    empty = base / "empty"
    empty.mkdir()
    return {"venv": venv, "python": venv_python, "bin": venv_python.parent, "cwd": empty, "home": base / "hf"}


def _make_venv(venv: Path) -> Path:
    """A new virtual environment (without pip) that sees this interpreter's installed packages after its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "harmodt_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


def test_installed_wheel_ships_its_files_and_every_console_script_helps(installed_wheel):
    env, cwd = _isolated_env(installed_wheel["home"]), installed_wheel["cwd"]
    where = subprocess.run(
        [str(installed_wheel["python"]), "-c", WHERE_FROM], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr[-3000:]
    files = [Path(f) for f in json.loads(where.stdout)]
    assert all(f.is_relative_to(installed_wheel["venv"]) for f in files), files  # nothing from the checkout
    package = files[0].parent
    assert (package / "hub" / "templates" / "model_card.md.j2").is_file()
    assert (package / "hub" / "templates" / "dataset_card.md.j2").is_file()
    assert (package / "configs" / "tiny.yaml").is_file()
    assert len(list((package / "configs" / "paper").glob("*.yaml"))) >= 40
    helps = {
        name: subprocess.Popen(
            [str(installed_wheel["bin"] / name), "--help"],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name in CONSOLE_SCRIPTS
    }
    for name, process in helps.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name} --help failed:\n{err[-3000:]}"
        assert out.startswith("usage:") and "--help" in out, (name, out[:500])
    assert not list(cwd.iterdir())  # --help wrote nothing


@pytest.fixture(scope="module")
def smoke_job(installed_wheel) -> dict:
    """``harmodt-main-job --smoke`` of the installed wheel, run from an empty folder."""
    output = installed_wheel["cwd"].parent / "out"
    result = subprocess.run(
        [str(installed_wheel["bin"] / "harmodt-main-job"), "--smoke", "--output", str(output)],
        cwd=installed_wheel["cwd"],
        env=_isolated_env(installed_wheel["home"]),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return {"output": output, "stdout": result.stdout}


@pytest.mark.slow
def test_smoke_job_of_the_installed_wheel_writes_a_loadable_model_folder(smoke_job):
    output = smoke_job["output"]
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
