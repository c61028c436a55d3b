"""Few-shot adaptation to a task added after training (issue #19), on real generated demonstrations read with
datasets: prompt tuning leaves the trained tasks bit-identical, the all-weights mode changes the new task and only
the weights its mask keeps; the adaptation config of training/train.py and evaluate's --add-task flags."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from helpers import random_inputs, tiny_prompted_model

from harmodt_hf import HarmoDTModel, HarmoDTTrainingArguments
from harmodt_hf.configs import config_path
from harmodt_hf.evaluation.cli import main as evaluate_main
from harmodt_hf.training.adapt_cli import adapt_main, adaptation_requested
from harmodt_hf.training.adaptation import adapt
from harmodt_hf.training.demonstrations import add_task_from_demonstrations

NEW = "drawer-close-v3"  # in the generated dataset, not among the tiny model's tasks (reach, push, pick-place)


def adapt_args(tmp_path, **overrides) -> HarmoDTTrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "adapt"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
        weight_decay=0.1, lr_scheduler_type="constant", mask_update_interval=3, mask_grad_batch_size=2,
        logging_steps=3, save_strategy="no", use_cpu=True, report_to="none", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, mask_updates=False,
    )  # fmt: skip
    values.update(overrides)
    return HarmoDTTrainingArguments(**values)


def model_with_new_task(generated_dataset, **overrides):
    model = tiny_prompted_model(seed=5, max_ep_len=500, **overrides)
    demos = add_task_from_demonstrations(model, NEW, generated_dataset, last=3)
    return model, demos


def actions_of(model, task_ids) -> torch.Tensor:
    inputs = random_inputs(model.config, task_ids, seed=7)
    inputs.pop("prompt")  # the stored prompts
    model.eval()
    with torch.no_grad():
        return model(**inputs).action_preds


def test_prompt_tuning_leaves_the_trained_tasks_bit_identical_and_changes_the_new_task(
    generated_dataset, tmp_path, one_torch_thread
):
    """Weight decay on, and the new task's mask updated too: every weight, every trained task's mask and prompt and
    so every trained action stays the same bit for bit; the new task's prompt, mask and actions move."""
    model, demos = model_with_new_task(generated_dataset)
    before = copy.deepcopy(model)
    trained, new = [0, 1, 2, 1, 0], [3, 3]
    adapt(model, [demos], adapt_args(tmp_path, mask_updates=True), train="prompt")
    assert torch.equal(actions_of(model, trained), actions_of(before, trained))
    assert not torch.equal(actions_of(model, new), actions_of(before, new))
    for name, value in before.state_dict().items():
        if "packed_masks" in name or name.startswith("stored_prompt"):
            assert torch.equal(model.state_dict()[name][:3], value[:3]), name
        else:
            assert torch.equal(model.state_dict()[name], value), name
    assert not torch.equal(model.stored_prompt_states[3], before.stored_prompt_states[3])
    moved = [
        name for name, rows in model.get_task_masks().items() if not torch.equal(rows, before.get_task_masks()[name])
    ]
    assert moved  # the new task's mask was updated
    assert all(p.requires_grad for p in model.parameters()) and "stored_prompt_states" in dict(model.named_buffers())


def test_all_weights_mode_changes_the_new_task_under_its_mask_only(generated_dataset, tmp_path, one_torch_thread):
    """The new task's actions change; the masked weights its mask drops stay as they were (the trainer puts them
    back); the trained tasks share the rest, so their actions change too (documented, measured in the study)."""
    model, demos = model_with_new_task(generated_dataset)
    before = copy.deepcopy(model)
    adapt(model, [demos], adapt_args(tmp_path), train="all")
    assert not torch.equal(actions_of(model, [3, 3]), actions_of(before, [3, 3]))
    dropped_somewhere = False
    for name, rows in before.get_task_masks().items():
        old, new = before.get_parameter(name), model.get_parameter(name)
        dropped = ~rows[3]
        dropped_somewhere |= bool(dropped.any())
        assert torch.equal(new[dropped], old[dropped]), name
        assert not torch.equal(new[rows[3]], old[rows[3]]), name
        assert torch.equal(model.get_task_masks()[name], rows)  # mask_updates=False: no mask moved
    assert dropped_somewhere
    assert not torch.equal(actions_of(model, [0, 1]), actions_of(before, [0, 1]))


def test_embeddings_mode_trains_the_shared_embeddings_and_head_but_not_the_body(generated_dataset, tmp_path):
    model, demos = model_with_new_task(generated_dataset)
    before = copy.deepcopy(model)
    adapt(model, [demos], adapt_args(tmp_path), train="embeddings")
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before.get_parameter(name))}
    assert changed and not any(name.startswith("transformer.") for name in changed)
    assert {"embed_state.weight", "predict_action.weight"} <= changed
    assert not torch.equal(model.stored_prompt_states[3], before.stored_prompt_states[3])
    assert torch.equal(model.stored_prompt_states[:3], before.stored_prompt_states[:3])


def test_adaptation_refuses_a_task_not_added_and_prompt_tuning_without_prompts(generated_dataset, tmp_path):
    model, demos = model_with_new_task(generated_dataset)
    plain = tiny_prompted_model(max_ep_len=500)
    with pytest.raises(ValueError, match="Add the task"):
        adapt(plain, [demos], adapt_args(tmp_path))
    mtdt = tiny_prompted_model(max_ep_len=500, use_prompt=False, mask_mode="none")
    mtdt.add_task(NEW, state_mean=demos.state_mean, state_std=demos.state_std)
    with pytest.raises(ValueError, match="train='prompt' tunes the new tasks' prompts"):
        adapt(mtdt, [demos], adapt_args(tmp_path), train="prompt")


def test_train_py_adapts_with_the_adaptation_config_and_evaluate_adds_a_task(generated_dataset, tmp_path):
    """training/train.py's adaptation path with harmodt_hf/configs/adapt.yaml on a saved model and real demos; then
    evaluate --add-task on the trained model (no adaptation): real environments, the new task's success recorded."""
    tiny_prompted_model(seed=5, max_ep_len=500).save_pretrained(tmp_path / "trained")
    argv = [
        "--config", str(config_path("adapt")), "--adapt_from", str(tmp_path / "trained"), "--dataset",
        str(generated_dataset), "--adapt_tasks", NEW, "--demo_episodes", "2", "--max_steps", "3",
        "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "adapted"),
    ]  # fmt: skip
    assert adaptation_requested(argv) and not adaptation_requested(["--config", str(config_path("tiny"))])
    final = adapt_main(argv)
    adapted = HarmoDTModel.from_pretrained(final)
    assert adapted.config.task_names[-1] == NEW and adapted.config.added_tasks[NEW]["mask"] == "merged"
    summary = json.loads((final / "adaptation_summary.json").read_text())
    assert summary["demo_episodes_used"] == {NEW: 2} and summary["adapt_train"] == "prompt"
    assert np.isfinite(summary["final_loss"])

    results = evaluate_main([
        "--model", str(tmp_path / "trained"), "--add-task", NEW, "--demos", str(generated_dataset),
        "--episodes-for-prompt", "2", "--episodes", "2", "--max-steps", "10", "--num-workers", "0",
        "--output", str(tmp_path / "eval" / "results.json"), "--plot", "none",
    ])  # fmt: skip
    assert list(results["per_task"]) == [NEW] and len(results["per_task"][NEW]["successes"]) == 2
    assert results["added_tasks"] == {NEW: {"mask": "merged", "merge_threshold": 2}}
    with pytest.raises(ValueError, match="--add-task needs --demos"):
        evaluate_main(["--model", str(tmp_path / "trained"), "--add-task", NEW, "--output", str(tmp_path / "r.json")])
