"""HarmoDTTrainer on in-memory data: what the mask selection receives, and which weights an optimizer step moves."""

from __future__ import annotations

import pytest
import torch
from helpers import synthetic_trainer
from transformers.utils import logging

import harmodt_hf.training.harmony
import harmodt_hf.training.reference_rule

logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------------------------------
# The one interception point of these tests: the selection entry points that HarmoDTTrainer.update_masks hands the
# per-task gradients to (second positional argument): harmony.harmony_mask_update(masks, task_grads, ...) for the
# "harmony" rule and reference_rule.reference_prune_regrow(masks_all, task_grads_all, ...) for "reference". Re-point
# SELECTION here when the mask update moves.
# ---------------------------------------------------------------------------------------------------------------------
SELECTION = {
    "harmony": (harmodt_hf.training.harmony, "harmony_mask_update"),
    "reference": (harmodt_hf.training.reference_rule, "reference_prune_regrow"),
}


def gradients_the_selection_receives(monkeypatch, tmp_path, rule: str, max_grad_norm: float) -> dict:
    """Run one mask update of a fresh (identically seeded) trainer; return a copy of the per-task gradients
    ``name -> (num_tasks, *shape)`` passed to the selection."""
    module, name = SELECTION[rule]
    real, seen = getattr(module, name), []

    def spy(masks, grads, *args, **kwargs):
        seen.append({n: g.detach().clone() for n, g in grads.items()})  # copied: the selection may overwrite them
        return real(masks, grads, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    trainer = synthetic_trainer(tmp_path / f"{rule}-{max_grad_norm}", update_rule=rule, max_grad_norm=max_grad_norm)
    trainer.state.max_steps, trainer.state.global_step = 100, 25  # k = eta_max at mid-schedule
    trainer.update_masks()
    monkeypatch.setattr(module, name, real)
    assert len(seen) == 1
    return seen[0]


def task_norms(grads: dict) -> torch.Tensor:
    """Each task's gradient norm over all parameters the selection sees, in float64."""
    num_tasks = next(iter(grads.values())).shape[0]
    squares = sum(g.double().reshape(num_tasks, -1).square().sum(1) for g in grads.values())
    return squares.sqrt()


@pytest.mark.parametrize("rule", ["harmony", "reference"])
def test_mask_selection_receives_each_tasks_gradient_clipped(monkeypatch, tmp_path, rule):
    """A tiny max_grad_norm: every task's gradient reaches the selection scaled to norm max_grad_norm (direction
    kept); a limit above every norm leaves the gradients exactly as without clipping (the scale is at most 1)."""
    raw = gradients_the_selection_receives(monkeypatch, tmp_path, rule, max_grad_norm=0.0)  # 0: no clipping
    raw_norms = task_norms(raw)
    limit = 1e-4
    assert bool((raw_norms > 100 * limit).all()), raw_norms  # clipping has to act at this limit

    clipped = gradients_the_selection_receives(monkeypatch, tmp_path, rule, max_grad_norm=limit)
    clipped_norms = task_norms(clipped)
    if rule == "harmony":  # the effective-weight gradient itself is clipped
        torch.testing.assert_close(clipped_norms, torch.full_like(raw_norms, limit), rtol=1e-4, atol=0)
    else:  # official order: the dense gradient is clipped, then masked, so what the selection sees is at most the limit
        assert bool((clipped_norms <= limit * (1 + 1e-4)).all() and (clipped_norms > 0.5 * limit).all()), clipped_norms
    for name, g in raw.items():  # one scale per task: the direction is kept
        scale = (clipped_norms / raw_norms).to(g.dtype).view(-1, *[1] * (g.dim() - 1))
        torch.testing.assert_close(clipped[name], g * scale, rtol=1e-4, atol=1e-12)

    loose = gradients_the_selection_receives(monkeypatch, tmp_path, rule, max_grad_norm=10 * float(raw_norms.max()))
    assert all(torch.equal(loose[name], g) for name, g in raw.items())


def test_all_tasks_step_moves_exactly_the_weights_some_task_uses(tmp_path):
    """Every task in every step, with weight decay: each masked weight active in at least one task's mask moves and
    every weight that no task uses keeps its value (weight decay and Adam included)."""
    trainer = synthetic_trainer(
        tmp_path, config_overrides=dict(sparsity=0.5), max_steps=2, weight_decay=0.1, learning_rate=1e-3
    )
    model = trainer.model
    masks = {name: m.clone() for name, m in model.get_task_masks().items()}
    before = {name: model.get_parameter(name).detach().clone() for name in masks}
    trainer.train()
    used_total = unused_total = 0
    for name, task_masks in masks.items():
        assert torch.equal(model.get_task_masks()[name], task_masks)  # no mask update in this run
        used = task_masks.any(dim=0)
        weight = model.get_parameter(name).detach()
        assert torch.equal(weight[~used], before[name][~used]), name
        assert bool((weight[used] != before[name][used]).all()), name
        partial = used & ~task_masks.all(dim=0)  # active in some tasks only: the weights 'all tasks' would freeze
        assert bool(partial.any()), name
        used_total, unused_total = used_total + int(used.sum()), unused_total + int((~used).sum())
    assert used_total > 0 and unused_total > 0
