"""Loading without the package (issue #17): save_pretrained writes the modelling code and an ``auto_map``, so
``AutoModel.from_pretrained(folder, trust_remote_code=True)`` works where ``harmodt_hf`` cannot be imported; the
model acts without ceremony (stored prompts by default, ``get_next_action``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_inputs, tiny_prompted_model
from transformers import AutoModel
from transformers.utils import logging

from harmodt_hf import HarmoDTModel
from harmodt_hf.evaluation import HarmoDTPolicy

logging.disable_progress_bar()

# Prepended to code run by `run_without_harmodt_hf`: drops the editable install's import hook and any sys.path entry
# holding a harmodt_hf folder, then proves the package unreachable.
ISOLATION = """\
import importlib.util, sys
from pathlib import Path
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "harmodt_hf").exists()]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("harmodt_hf") is None, "harmodt_hf is still importable"
"""


def run_without_harmodt_hf(code: str, cwd: Path, **env: str) -> str:
    """Run ``code`` in a fresh Python (this venv) that cannot import harmodt_hf; returns its stdout."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environment.update(HF_MODULES_CACHE=str(cwd / "hf-modules"), **env)
    result = subprocess.run(
        [sys.executable, "-c", ISOLATION + code], cwd=cwd, env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_saved_folder_holds_the_code_and_the_auto_map(tmp_path):
    tiny_prompted_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_harmodt.HarmoDTConfig",
        "AutoModel": "modeling_harmodt.HarmoDTModel",
    }
    code = {path.name for path in tmp_path.glob("*.py")}
    assert {"modeling_harmodt.py", "configuration_harmodt.py", "masked_linear.py", "masks.py"} <= code
    allowed = {"__future__", "collections", "contextlib", "dataclasses", "math", "os", "typing", "zlib"}
    allowed |= {"numpy", "torch", "transformers", ""}  # "": relative imports
    for path in tmp_path.glob("*.py"):  # self-contained: torch, numpy, transformers and relative imports only
        lines = path.read_text().splitlines()
        imports = {line.split()[1].split(".")[0] for line in lines if line.startswith(("import ", "from "))}
        assert imports <= allowed, (path.name, imports - allowed)


def test_auto_model_with_remote_code_acts_as_the_original_without_harmodt_hf(tmp_path):
    """A subprocess that cannot import harmodt_hf loads the folder with trust_remote_code=True: the same actions for
    a mixed batch, and get_next_action on a short history."""
    model = tiny_prompted_model(seed=2)
    model.save_pretrained(tmp_path / "model")
    inputs = random_inputs(model.config, [2, 0, 1, 0], seed=3)
    torch.save(inputs, tmp_path / "inputs.pt")
    history = np.random.default_rng(0).normal(size=(3, 39))
    np.save(tmp_path / "history.npy", history)
    code = """
import numpy as np, torch
from transformers import AutoModel
model = AutoModel.from_pretrained("model", trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    np.save("actions.npy", model(**torch.load("inputs.pt")).action_preds.numpy())
states = np.load("history.npy")
np.save("next.npy", model.get_next_action("push-v3", states, [[0.1, 0.2, 0.3, 0.4]] * 2, [1.0, 2.0]))
"""
    run_without_harmodt_hf(code, tmp_path, HF_HUB_OFFLINE="1")
    with torch.no_grad():
        expected = model(**inputs).action_preds.numpy()
    np.testing.assert_allclose(np.load(tmp_path / "actions.npy"), expected, rtol=0, atol=1e-6)
    next_action = model.get_next_action("push-v3", history, [[0.1, 0.2, 0.3, 0.4]] * 2, [1.0, 2.0])
    np.testing.assert_allclose(np.load(tmp_path / "next.npy"), next_action, rtol=0, atol=1e-6)


def test_with_harmodt_hf_imported_the_installed_classes_load(tmp_path):
    tiny_prompted_model().save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path, trust_remote_code=True)) is HarmoDTModel


def test_forward_without_a_prompt_uses_the_stored_prompts(tmp_path):
    """After from_pretrained, model(...) with task ids only equals the call with the stored prompts passed."""
    tiny_prompted_model(seed=4).save_pretrained(tmp_path)
    model = HarmoDTModel.from_pretrained(tmp_path)
    inputs = random_inputs(model.config, [1, 2, 0, 1], seed=5)
    del inputs["prompt"]
    with torch.no_grad():
        plain = model(**inputs).action_preds
        explicit = model(**inputs, prompt=model.task_prompts(inputs["task_ids"])).action_preds
    assert torch.equal(plain, explicit)
    empty = HarmoDTModel(model.config)  # no prompt stored: the clear error
    with torch.no_grad(), pytest.raises(ValueError, match="no stored prompt"):
        empty(**inputs)


def test_get_next_action_acts_as_the_policy_over_a_whole_window(one_torch_thread):
    """Step by step over more steps than the context window, get_next_action gives the actions of HarmoDTPolicy
    (stored prompt tokens, last action only) on the same history: normalisation, returns-to-go, window and padding."""
    model = tiny_prompted_model(seed=6, target_returns=[10.0, 20.0, 30.0], return_scale=10.0,
                                state_mean=[[0.5] * 39] * 3, state_std=[[2.0] * 39] * 3)  # fmt: skip
    policy = HarmoDTPolicy(model, cache_prompt=False)
    policy.reset(["pick-place-v3"])
    rng = np.random.default_rng(1)
    states, actions, rewards = [], [], []
    for step in range(model.config.context_length + 3):
        states.append(rng.normal(size=39))
        expected = policy.act(np.asarray(states[-1:]), rewards[-1:] if step else None)[0]
        got = model.get_next_action("pick-place-v3", states, actions, rewards)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        actions.append(expected)
        rewards.append(float(rng.random()))


def test_the_cards_snippet_runs_as_printed_from_the_hub_without_harmodt_hf(hub_server, tmp_path):
    """The model folder pushed to a (loopback) Hub; the card's first Python snippet, unchanged, runs in a Python that
    cannot import harmodt_hf and prints the action get_next_action gives here."""
    from test_cards import fake_results

    from harmodt_hf.hub.cards import write_model_folder
    from harmodt_hf.hub.push import push_model

    model = tiny_prompted_model(seed=8)
    repo_id = f"test-user/harmodt-card-{uuid.uuid4().hex[:8]}"
    folder = write_model_folder(model, tmp_path / "model", fake_results(), repo_id=repo_id)
    push_model(folder, repo_id)
    snippet = (folder / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    assert f'AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)' in snippet
    printed = run_without_harmodt_hf(snippet, tmp_path)
    zero = np.zeros(model.config.state_dim)
    first = model.get_next_action(model.config.task_names[0], [zero])
    expected = model.get_next_action(model.config.task_names[0], [zero, zero], [first], [0.0])
    np.testing.assert_allclose(np.array(printed.strip().strip("[]").split(), dtype=float), expected, atol=1e-6)
