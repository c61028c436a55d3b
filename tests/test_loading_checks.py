"""What from_pretrained refuses (issue #18), on real saved models: each refusal names the file and the fix."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import random_inputs, tiny_prompted_model
from safetensors.torch import load_file, save_file
from transformers.utils import logging

from harmodt_hf import HarmoDTConfig, HarmoDTModel

logging.disable_progress_bar()


@pytest.fixture
def folder(tmp_path):
    """A saved tiny model with per-task state statistics and target returns (reach, push, pick-place)."""
    model = tiny_prompted_model(
        seed=1, state_mean=[[float(t)] * 39 for t in range(3)], target_returns=[100.0, 200.0, 300.0]
    )
    model.save_pretrained(tmp_path)
    return tmp_path


def _edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_weights(folder, edit) -> None:
    path = folder / "model.safetensors"
    weights = load_file(path)
    edit(weights)
    save_file(weights, path, metadata={"format": "pt"})


def test_a_folder_without_config_json_is_refused(folder):
    """Without config.json transformers would build a default config (task 'task-0', mean 0 / std 1) and load the
    weights into it; refused unless a config is given."""
    config = HarmoDTConfig.from_json_file(folder / "config.json")
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match=r"has no config\.json.*save_pretrained.*config=") as error:
        HarmoDTModel.from_pretrained(folder)
    assert str(folder) in str(error.value)
    model = HarmoDTModel.from_pretrained(folder, config=config)
    assert model.config.task_names == config.task_names and model.config.state_mean == config.state_mean


def test_task_names_reordered_in_config_json_are_refused(folder):
    """Reordered task names (with their per-task rows, as an edit would) would attach every task's masks and prompt
    to another name: refused, naming the saved order, the weights file and what to restore."""
    config = json.loads((folder / "config.json").read_text())
    order = [1, 0, 2]
    _edit_config(folder, **{key: [config[key][i] for i in order] for key in ("task_names", "state_mean", "state_std",
                                                                             "target_returns")})  # fmt: skip
    with pytest.raises(ValueError, match=r"another order.*saved \['reach-v3', 'push-v3', 'pick-place-v3'\]") as error:
        HarmoDTModel.from_pretrained(folder)
    assert f"{folder}/model.safetensors" in str(error.value) and "Restore task_names in config.json" in str(error.value)
    _edit_config(folder, **config)  # as saved, then one task renamed
    _edit_config(folder, task_names=["reach-v3", "push-v3", "door-open-v3"])
    with pytest.raises(ValueError, match="are not the tasks"):
        HarmoDTModel.from_pretrained(folder)


def test_mask_mode_none_over_saved_masks_is_refused(folder):
    _edit_config(folder, mask_mode="none")
    with pytest.raises(ValueError, match=r"holds task masks .* mask_mode='none'.*'harmony' or 'random'") as error:
        HarmoDTModel.from_pretrained(folder)
    assert f"{folder}/model.safetensors" in str(error.value)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights_are_refused(folder, value):
    def poison(weights):
        weights["predict_action.weight"][0, 0] = value

    _edit_weights(folder, poison)
    with pytest.raises(ValueError, match=r"predict_action\.weight holds NaN or infinite values") as error:
        HarmoDTModel.from_pretrained(folder)
    assert f"{folder}/model.safetensors" in str(error.value) and "earlier checkpoint" in str(error.value)


def test_a_checkpoint_saved_before_the_task_checksums_still_loads(folder):
    """Older checkpoints lack ``task_name_crc32``: they load as before (their task order cannot be checked)."""
    model = HarmoDTModel.from_pretrained(folder)
    _edit_weights(folder, lambda weights: weights.pop("task_name_crc32"))
    old = HarmoDTModel.from_pretrained(folder)
    inputs = random_inputs(model.config, [2, 0, 1])
    with torch.no_grad():
        assert torch.equal(old(**inputs).action_preds, model(**inputs).action_preds)
