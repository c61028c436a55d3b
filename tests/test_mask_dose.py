"""The mask schedule's dose (a fraction of each task's mask), the churn control, paired seeds, and the schedule fixes.

Trainers are built on the session's generated data (3 tasks) with a small model; no test trains for long.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import GENERATED_TASKS
from transformers.utils import logging

from harmodt_hf.training.cli import build_trainer, load_episodes, main, parse_train_args
from harmodt_hf.training.harmony import random_mask_update, select_prune_regrow

logging.disable_progress_bar()
SMALL = [
    "--hidden_size", "32", "--n_layer", "2", "--n_head", "2", "--n_inner", "64", "--context_length", "10",
    "--prompt_length", "3", "--dropout", "0.0",
]  # fmt: skip


def _argv(dataset, out, *extra: str) -> list[str]:
    return [
        "--dataset", str(dataset), "--dataset_config", "all-near-optimal", "--output_dir", str(out), *SMALL,
        "--per_device_train_batch_size", "12", "--task_sampling", "all_tasks", "--learning_rate", "1e-3",
        "--max_steps", "20", "--mask_update_interval", "10", "--mask_grad_batch_size", "4", "--logging_steps", "10",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
        "--seed", "0", *extra,
    ]  # fmt: skip


def _trainer(dataset, out, *extra: str):
    model_args, data_args, training_args = parse_train_args(_argv(dataset, out, *extra))
    return build_trainer(model_args, data_args, training_args, load_episodes(data_args))


def _official_k(iteration: int, max_iters: int, eta_max: float) -> int:
    """main.py's ``cosine_annealing(iter / max_iters)`` with η_min = 0 (the update after 0-based ``iteration``)."""
    return int(eta_max + 0.5 * (0 - eta_max) * (1 + math.cos(2 * math.pi * iteration / max_iters)))


def test_fraction_dose_moves_the_stated_share(generated_dataset, tmp_path):
    final = main(_argv(generated_dataset, tmp_path / "run", "--eta_max_fraction", "0.05"))
    summary = json.loads((final / "training_summary.json").read_text())
    history = summary["mask_history"]
    trainer = _trainer(generated_dataset, tmp_path / "probe")
    active = trainer.active_weights_per_task()
    eta_max = int(0.05 * active)
    expected_k = [_official_k(step - 1, 20, eta_max) for step in (10, 20)]
    assert [r["mask/k"] for r in history] == expected_k and expected_k[0] > 100
    assert summary["planned_moved_fraction"] == pytest.approx(sum(expected_k) / active)
    # After the first update exactly k weights of each task's initial mask have left it (within one weight).
    assert history[0]["mask/moved_fraction"] == pytest.approx(expected_k[0] / active, abs=1 / active)
    for task in GENERATED_TASKS:
        assert abs(history[0][f"mask/moved/{task}"] * active - expected_k[0]) <= 1
        moved = summary["moved_fraction"][task] * active
        assert expected_k[0] - expected_k[1] - 1 <= moved <= sum(expected_k) + 1


def test_eta_schedule_uses_the_zero_based_iteration(generated_dataset, tmp_path):
    """Official: the update after iteration ``iter`` (0-based) uses α = iter / max_iters: k = 39, not 40, here."""
    final = main(_argv(generated_dataset, tmp_path / "run", "--eta_max", "40", "--eta_total_steps", "20",
                       "--max_steps", "10"))  # fmt: skip
    history = json.loads((final / "training_summary.json").read_text())["mask_history"]
    assert [r["mask/k"] for r in history] == [_official_k(9, 20, 40)] == [39]
    trainer = _trainer(generated_dataset, tmp_path / "probe", "--eta_max", "100", "--max_steps", "1000")
    assert trainer.prune_count_at(500) == 99  # the middle update of 1000 steps (REFERENCE.md)


def test_eta_total_steps_shorter_than_training_is_refused(generated_dataset, tmp_path):
    with pytest.raises(ValueError, match="eta_total_steps=10 is shorter than max_steps=20"):
        _trainer(generated_dataset, tmp_path / "run", "--eta_total_steps", "10")


def test_churn_rule_moves_as_many_weights_as_harmony_but_others():
    generator = torch.Generator().manual_seed(0)
    masks = {name: torch.rand(3, *shape, generator=generator) < 0.8 for name, shape in (("a", (6, 7)), ("b", (9,)))}
    grads = {name: torch.randn(m.shape, generator=generator) for name, m in masks.items()}
    mean = {name: g.mean(0, keepdim=True) for name, g in grads.items()}
    agreement = {name: mean[name] * g for name, g in grads.items()}
    prune = {name: g * g + 10 * agreement[name] for name, g in grads.items()}
    harmony, harmony_stats = select_prune_regrow(masks, prune, agreement, 4)
    churn, churn_stats = random_mask_update(masks, 4, torch.Generator().manual_seed(1))
    again, _ = random_mask_update(masks, 4, torch.Generator().manual_seed(1))
    assert torch.equal(churn_stats["pruned"], harmony_stats["pruned"]) and churn_stats["pruned"].tolist() == [4] * 3
    assert torch.equal(churn_stats["regrown"], harmony_stats["regrown"])
    assert torch.equal(churn_stats["active"], harmony_stats["active"])
    assert all(torch.equal(again[n], churn[n]) for n in masks)  # same generator, same choices
    assert not all(torch.equal(harmony[n], churn[n]) for n in masks)
    pruned = sum((mask & ~churn[name]).reshape(3, -1).sum(1) for name, mask in masks.items())
    regrown = sum((~mask & churn[name]).reshape(3, -1).sum(1) for name, mask in masks.items())
    assert pruned.tolist() == regrown.tolist() == [4, 4, 4]  # pruned from the active set, regrown from the inactive


def test_churn_variant_follows_the_harmony_schedule_with_other_choices(generated_dataset, tmp_path):
    runs = {}
    for variant in ("harmodt-f", "harmodt-churn"):
        final = main(_argv(generated_dataset, tmp_path / variant, "--variant", variant, "--eta_max", "60",
                           "--eta_total_steps", "20"))  # fmt: skip
        runs[variant] = json.loads((final / "training_summary.json").read_text())
    harmony, churn = runs["harmodt-f"], runs["harmodt-churn"]
    assert churn["score"] == "random" and harmony["score"] == "fisher"
    for h, c in zip(harmony["mask_history"], churn["mask_history"], strict=True):
        assert c["mask/k"] == h["mask/k"] > 0
        assert c["mask/pruned"] == h["mask/pruned"] == c["mask/regrown"] == h["mask/k"] * len(GENERATED_TASKS)
        assert c["hash"] != h["hash"]
    assert churn["mask_history"][0]["mask/moved_fraction"] == harmony["mask_history"][0]["mask/moved_fraction"]


def test_each_seed_draws_its_masks_and_arms_with_one_seed_start_paired(generated_dataset, tmp_path):
    starts = {}
    for variant, seed in [("harmodt-f", 1), ("harmodt-f", 2), ("harmodt-r", 2), ("harmodt-churn", 2),
                          ("harmodt-m", 2)]:  # fmt: skip
        trainer = _trainer(generated_dataset, tmp_path / f"{variant}{seed}", "--variant", variant, "--seed", str(seed))
        assert trainer.harmodt.config.mask_seed == seed
        starts[variant, seed] = (trainer.initial_masks, {k: v.clone() for k, v in trainer.harmodt.state_dict().items()})
    masks_1, masks_2 = starts["harmodt-f", 1][0], starts["harmodt-f", 2][0]
    assert not all(torch.equal(masks_1[n], masks_2[n]) for n in masks_1)
    for variant in ("harmodt-r", "harmodt-churn", "harmodt-m"):
        masks, weights = starts[variant, 2]
        assert all(torch.equal(masks[n], masks_2[n]) for n in masks_2), variant
        assert all(torch.equal(w, starts["harmodt-f", 2][1][k]) for k, w in weights.items()), variant
    explicit = _trainer(generated_dataset, tmp_path / "explicit", "--seed", "2", "--mask_seed", "7")
    assert explicit.harmodt.config.mask_seed == 7


def test_reference_gradients_clip_the_dense_gradient_then_mask(generated_dataset, tmp_path):
    """Official order (``update_gradient``): the gradient w.r.t. the masked weights W ⊙ M_t, over all parameters, is
    clipped to max_grad_norm, then multiplied by the task's masks (``embed``/``predict`` parameters unmasked)."""
    trainer = _trainer(generated_dataset, tmp_path / "run", "--update_rule", "reference", "--task_sampling",
                       "round_robin", "--per_device_train_batch_size", "4", "--max_grad_norm", "0.01")  # fmt: skip
    model = trainer.harmodt
    model.train()
    grads, _ = trainer.reference.task_gradients(lambda task: trainer._task_loss(task, tag=1), 0.01)
    masks_all = trainer.reference.masks_all()
    for task in range(model.config.num_tasks):
        # The official way: load W ⊙ M_t into a model whose forward masks nothing more, then differentiate.
        dense_model = copy.deepcopy(model)
        with torch.no_grad():
            for layer in dense_model.masked_layers().values():
                layer.weight.mul_(layer.task_masks()[task])
                layer.set_task_masks(torch.ones_like(layer.task_masks()))
        loss = trainer._task_loss(task, tag=1, model=dense_model)  # the same fresh batch, through the dense copy
        params = dict(dense_model.named_parameters())
        dense = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True), strict=True))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in dense.values() if g is not None))
        assert norm > 0.01  # clipping acts
        scale = 0.01 / (norm + 1e-6)
        for name, g in dense.items():
            if g is None:
                continue
            expected = g * scale if ("embed" in name or "predict" in name) else g * scale * masks_all[name][task]
            torch.testing.assert_close(grads[name][task], expected, rtol=1e-5, atol=1e-9, msg=name)
