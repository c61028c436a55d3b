"""Tests of Algorithm 1 (harmodt_hf.training.harmony: task gradients, scores, selection, η schedule) and of the
official numerics (harmodt_hf.training.reference_rule)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import bool_tensor, float_tensor, random_inputs, tiny_config

from harmodt_hf import HarmoDTModel
from harmodt_hf.training.harmony import (
    agreement_score,
    clip_task_gradients,
    harmony_mask_update,
    harmony_score,
    importance_score,
    prune_and_regrow,
    prune_count,
    select_prune_regrow,
    task_gradients,
)
from harmodt_hf.training.reference_rule import official_mean_gradient, reference_prune_regrow

# ---------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------


def test_scores_values():
    g = torch.tensor([[1.0, -2.0, 0.0, 0.5], [3.0, 2.0, 4.0, -0.5]])  # two tasks' flat gradients
    mean = g.mean(dim=0)  # [2, 0, 2, 0]
    theta = torch.tensor([-1.0, 0.5, 2.0, 3.0])
    assert torch.equal(agreement_score(mean, g[0]), torch.tensor([2.0, 0.0, 0.0, 0.0]))
    assert torch.equal(agreement_score(mean, g[1]), torch.tensor([6.0, 0.0, 8.0, 0.0]))
    assert torch.equal(importance_score(g[1], None, "fisher"), g[1] ** 2)
    assert torch.equal(importance_score(g[1], theta, "magnitude"), theta.abs())
    harmony = harmony_score(agreement_score(mean, g[1]), importance_score(g[1], None, "fisher"), gamma=10.0)
    assert torch.equal(harmony, torch.tensor([69.0, 4.0, 96.0, 0.25]))
    with pytest.raises(ValueError, match="kind"):
        importance_score(g[0], theta, "grad")
    with pytest.raises(ValueError, match="magnitude"):
        importance_score(g[0], None, "magnitude")


def test_prune_and_regrow_one_task():
    mask = bool_tensor([1, 1, 0, 1, 0, 0])
    new, pruned, regrown = prune_and_regrow(
        mask, float_tensor([3, 1, -9, 2, -9, -9]), float_tensor([9, 9, 1, 9, 3, 2]), 1
    )
    assert pruned.tolist() == [1] and regrown.tolist() == [4]  # inactive/active scores are never candidates
    assert new.tolist() == [True, False, False, True, True, False] and mask.tolist()[1]  # the input is untouched
    with pytest.raises(ValueError, match="k=4"):
        prune_and_regrow(mask, float_tensor([0] * 6), float_tensor([0] * 6), 4)


def plain_scores(grads, params, kind, gamma, names):
    """The scores written out plainly on the (T, N) concatenation: ḡ⊙g_i (regrow) and γ·ḡ⊙g_i + importance (prune)."""
    T = grads[names[0]].shape[0]
    g = torch.cat([grads[n].reshape(T, -1) for n in names], 1)
    agree = g.mean(0, keepdim=True) * g
    importance = g * g if kind == "fisher" else torch.cat([params[n].reshape(-1) for n in names]).abs().expand(T, -1)
    return importance + gamma * agree, agree


# ---------------------------------------------------------------------------------------------------------------
# Selection, rule "harmony"
# ---------------------------------------------------------------------------------------------------------------


def small_case():
    """T=2; params a (2,3) and b (4,), flat indices a: 0..5, b: 6..9."""
    masks = {
        "a": bool_tensor([[[1, 1, 0], [1, 0, 1]], [[0, 1, 1], [1, 1, 0]]]),
        "b": bool_tensor([[1, 0, 1, 1], [0, 1, 1, 0]]),
    }
    # task 0: active 0,1,3,5,6,8,9 ; inactive 2,4,7.  task 1: active 1,2,3,4,7,8 ; inactive 0,5,6,9.
    # Inactive entries get the lowest prune scores and active ones the highest regrow scores: both must be ignored.
    prune = {
        "a": float_tensor([[[5, 1, -100], [3, -50, 2]], [[-9, 7, 0.1], [8, 0.2, -9]]]),
        "b": float_tensor([[4, -70, 0.5, 6], [-9, 3, 9, -9]]),
    }
    regrow = {
        "a": float_tensor([[[90, 90, 0.1], [90, 0.3, 90]], [[-1, 90, 90], [90, 90, 5]]]),
        "b": float_tensor([[90, 0.2, 1000, 90], [2, 90, 90, 3]]),
    }
    return masks, prune, regrow


def test_select_prune_regrow_hand_computed():
    masks, prune, regrow = small_case()
    new, stats = select_prune_regrow(masks, prune, regrow, k=2)
    # task 0: prune lowest active {8: 0.5, 1: 1}; regrow highest inactive {4: 0.3, 7: 0.2} (8 scores 1000 but was
    # active before the update, so it is not regrown). task 1: prune {2: 0.1, 4: 0.2}; regrow {9: 3, 5: 5}.
    assert stats["prune_indices"].tolist() == [[1, 8], [2, 4]]
    assert stats["regrow_indices"].tolist() == [[4, 7], [5, 9]]
    assert new["a"].tolist() == [[[1, 0, 0], [1, 1, 1]], [[0, 1, 0], [1, 0, 1]]]
    assert new["b"].tolist() == [[1, 1, 0, 1], [0, 1, 1, 1]]
    assert stats["pruned"].tolist() == [2, 2] and stats["regrown"].tolist() == [2, 2]
    assert stats["active"].tolist() == [7, 6]
    # inputs untouched
    assert torch.equal(masks["a"], small_case()[0]["a"]) and torch.equal(prune["a"], small_case()[1]["a"])


def test_select_prune_regrow_k_zero_and_errors():
    masks, prune, regrow = small_case()
    new, stats = select_prune_regrow(masks, prune, regrow, k=0)
    assert all(torch.equal(new[n], masks[n]) for n in masks)
    assert stats["pruned"].tolist() == [0, 0] and stats["regrown"].tolist() == [0, 0]
    # task 0 has 3 inactive weights, task 1 has 4: k=4 is too many
    with pytest.raises(ValueError, match=r"k=4.*active counts \[7, 6\].*inactive counts \[3, 4\]"):
        select_prune_regrow(masks, prune, regrow, k=4)
    with pytest.raises(ValueError, match="k must be"):
        select_prune_regrow(masks, prune, regrow, k=-1)
    bad = {n: v.clone() for n, v in prune.items()}
    bad["a"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select_prune_regrow(masks, bad, regrow, k=1)
    with pytest.raises(ValueError, match="shape"):
        select_prune_regrow(masks, {"a": prune["a"], "b": prune["b"][:, :3]}, regrow, k=1)


def test_select_prune_regrow_infinite_scores_stay_exact():
    masks = {"w": bool_tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]])}
    prune = {"w": float_tensor([[float("inf"), 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, float("inf"), 1.0]])}
    regrow = {"w": float_tensor([[5.0, 5.0, float("-inf"), float("-inf"), 0.0], [float("-inf"), 0.0, 0.0, 0.0, 0.0]])}
    new, stats = select_prune_regrow(masks, prune, regrow, k=2)
    assert stats["prune_indices"].tolist() == [[0, 1], [2, 4]]
    assert stats["regrow_indices"][1].tolist() == [0, 1]
    assert set(stats["regrow_indices"][0].tolist()) <= {2, 3, 4} and 4 in stats["regrow_indices"][0].tolist()
    assert new["w"].sum(1).tolist() == [2, 3]


def brute_force_select(flat_masks, flat_prune, flat_regrow, k):
    prune_idx, regrow_idx = [], []
    for m, p, r in zip(flat_masks.tolist(), flat_prune.tolist(), flat_regrow.tolist(), strict=True):
        active = [i for i, v in enumerate(m) if v]
        inactive = [i for i, v in enumerate(m) if not v]
        prune_idx.append(sorted(sorted(active, key=lambda i: p[i])[:k]))
        regrow_idx.append(sorted(sorted(inactive, key=lambda i: -r[i])[:k]))
    return prune_idx, regrow_idx


def test_select_prune_regrow_matches_brute_force_and_preserves_counts():
    g = torch.Generator().manual_seed(7)
    shapes = {"x": (6, 5), "y": (7,), "z": (3, 2, 2)}
    T = 5
    masks = {n: torch.rand((T, *s), generator=g) < 0.6 for n, s in shapes.items()}
    grads = {n: torch.randn((T, *s), generator=g) for n, s in shapes.items()}
    params = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    agree = {n: grads[n].mean(0, keepdim=True) * grads[n] for n in shapes}
    prune = {n: params[n].abs() + 10.0 * agree[n] for n in shapes}  # magnitude importance
    flat = lambda d: torch.cat([d[n].reshape(T, -1) for n in shapes], 1)  # noqa: E731
    before = flat(masks).sum(1)
    k = min(int(before.min()), int((~flat(masks)).sum(1).min()), 4)
    assert k == 4
    new, stats = select_prune_regrow(masks, prune, agree, k=k)
    exp_prune, exp_regrow = brute_force_select(flat(masks), flat(prune), flat(agree), k)
    assert stats["prune_indices"].tolist() == exp_prune
    assert stats["regrow_indices"].tolist() == exp_regrow
    assert torch.equal(flat(new).sum(1), before)
    changed = flat(new) ^ flat(masks)
    assert changed.sum(1).tolist() == [2 * k] * T


@pytest.mark.parametrize("kind", ["fisher", "magnitude"])
def test_harmony_mask_update_matches_brute_force_on_random_problems(kind):
    """Scores then selection on parameters of several shapes (one smaller than k): the indices of sorting every
    task's scores by hand; the inputs are untouched and every task keeps its active count."""
    g = torch.Generator().manual_seed(11)
    shapes = {"x": (40, 30), "y": (3,), "z": (20, 5, 4)}
    T, k = 6, 25
    masks = {n: torch.rand((T, *s), generator=g) < 0.7 for n, s in shapes.items()}
    grads = {n: torch.randn((T, *s), generator=g) * 1e-3 for n, s in shapes.items()}
    params = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    before = {n: v.clone() for n, v in grads.items()}
    new, stats = harmony_mask_update(masks, grads, params, k, 10.0, kind)
    prune, agree = plain_scores(grads, params, kind, 10.0, list(shapes))
    flat = lambda d: torch.cat([d[n].reshape(T, -1) for n in shapes], 1)  # noqa: E731
    exp_prune, exp_regrow = brute_force_select(flat(masks), prune, agree, k)
    assert stats["prune_indices"].tolist() == exp_prune and stats["regrow_indices"].tolist() == exp_regrow
    assert torch.equal(flat(new).sum(1), flat(masks).sum(1))
    assert all(torch.equal(grads[n], before[n]) for n in shapes)


def test_harmony_mask_update_rejects_non_finite_gradients():
    masks = {"w": bool_tensor([[1, 1, 0, 0], [0, 1, 1, 0]])}
    grads = {"w": float_tensor([[1.0, float("inf"), 0.0, 2.0], [0.5, 0.0, 1.0, 1.0]])}
    with pytest.raises(ValueError, match="finite"):
        harmony_mask_update(masks, grads, None, 1, 10.0, "fisher")
    grads["w"][0, 1] = 0.0
    with pytest.raises(ValueError, match="magnitude"):
        harmony_mask_update(masks, grads, None, 1, 10.0, "magnitude")


def test_task_gradients_are_each_tasks_gradient_wrt_its_effective_weights():
    """Step 1: row i of every layer's gradient is the gradient of task i's loss with respect to θ ⊙ M_i, taken in a
    copy of the model whose weights are θ ⊙ M_i and whose masks are all ones (so non-zero where M_i is 0 too)."""
    torch.manual_seed(0)
    model = HarmoDTModel(tiny_config(use_prompt=False)).eval()
    inputs = {t: random_inputs(model.config, [t, t], seed=t) for t in range(model.config.num_tasks)}

    def task_loss(net, task):
        return net(**inputs[task], labels=inputs[task]["actions"]).loss

    grads, losses = task_gradients(model, lambda task: task_loss(model, task))
    assert all(layer.task_grad_sink is None for layer in model.masked_layers().values())
    for task in range(model.config.num_tasks):
        dense = HarmoDTModel(model.config).eval()
        dense.load_state_dict(model.state_dict())
        with torch.no_grad():
            for layer in dense.masked_layers().values():
                layer.weight.mul_(layer.task_masks()[task])
                layer.set_task_masks(torch.ones_like(layer.task_masks()))
        loss = task_loss(dense, task)
        assert losses[task].item() == pytest.approx(loss.item(), rel=1e-6)
        names = [f"{n}.weight" for n in dense.masked_layers()]
        expected = torch.autograd.grad(loss, [dense.get_parameter(n) for n in names])
        off_mask = 0
        for name, g in zip(names, expected, strict=True):
            torch.testing.assert_close(grads[name][task], g, rtol=1e-5, atol=1e-8, msg=name)
            off_mask += int((g[~model.get_task_masks()[name][task]] != 0).sum())
        assert off_mask > 0  # a signal where the task's mask is off, which regrowing needs


def test_clip_task_gradients_scales_each_task_to_the_limit():
    grads = {"a": float_tensor([[3.0, 0.0], [0.3, 0.0]]), "b": float_tensor([[4.0], [0.4]])}  # norms 5 and 0.5
    clip_task_gradients(grads, 1.0)
    torch.testing.assert_close(grads["a"], float_tensor([[0.6, 0.0], [0.3, 0.0]]), rtol=1e-5, atol=0)
    torch.testing.assert_close(grads["b"], float_tensor([[0.8], [0.4]]), rtol=1e-5, atol=0)
    clip_task_gradients(grads, 0.0)  # 0: no clipping
    torch.testing.assert_close(grads["b"], float_tensor([[0.8], [0.4]]), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Selection, rule "reference" (official numerics)
# ---------------------------------------------------------------------------------------------------------------


def test_official_mean_gradient_is_sequential_sum_times_float32_reciprocal():
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(4096, generator=g) for _ in range(7)]
    first = grads[0].clone()
    got = official_mean_gradient(iter(grads))
    acc = grads[0].numpy().copy()
    for x in grads[1:]:
        acc = acc + x.numpy()
    expected = acc * (np.float32(1.0) / np.float32(7.0))
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy(), expected)
    assert not np.array_equal(got.numpy(), acc / np.float32(7.0))  # true division rounds differently somewhere
    assert torch.equal(grads[0], first)  # inputs untouched


def test_reference_task0_uses_mean_gradient():
    """Flaw 3: task 0's own gradient is replaced by ḡ (in-place sum into its buffer)."""
    names = ["transformer.h.0.w", "embed.w"]
    masks = {names[0]: bool_tensor([[1, 1, 0, 0], [1, 1, 0, 0]]), names[1]: bool_tensor([[1, 1], [1, 1]])}
    grads = {
        names[0]: float_tensor([[0.0, 0.3, 0.0, 0.0], [0.4, -0.3, 0.0, 0.0]]),  # masked body gradients
        names[1]: float_tensor([[0.5, 0.5], [0.5, 0.5]]),  # embeddings: unmasked
    }
    # ḡ = [0.2, 0, 0, 0 | 0.5, 0.5]; gamma = 0 → prune score = g_i² on active entries.
    # Task 0 official: g_0 := ḡ → scores [0.04, 0, ., . | .25, .25] → prunes 1 (its own g_0² would prune 0).
    # Task 1: [0.16, 0.09, ., . | .25, .25] → prunes 1.
    new, stats = reference_prune_regrow(masks, grads, None, k=1, gamma=0.0, kind="fisher")
    assert stats["prune_indices"].tolist() == [[1], [1]]
    # regrow: inactive body entries have g = 0 → score exactly 1.0: a tie between 2 and 3
    assert stats["regrow_ties"].tolist() == [2, 2]
    assert all(i in (2, 3) for i in stats["regrow_indices"].flatten().tolist())
    assert stats["active"].tolist() == [4, 4]
    # the harmony rule with the same gradients uses g_0 itself: prunes entry 0 for task 0
    _, hstats = harmony_mask_update(masks, grads, None, 1, 0.0, "fisher")
    assert hstats["prune_indices"].tolist() == [[0], [1]]


def test_reference_regrow_ties_and_float32_rounding():
    """Flaw 1 & 2: inactive entries with g_i = 0 (and any ḡ·g_i < ~6e-8) all score exactly 1.0 in float32."""
    body, emb = "transformer.h.0.attn.w", "embed_timestep.weight"
    masks = {
        body: bool_tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]),
        emb: bool_tensor([[1, 1, 1, 1], [1, 0, 0, 0]]),
    }
    grads = {
        body: float_tensor([[0.01, 0.02, 0.0, 0.05, 0.0, 0.0], [0.01, -0.02, 0.03, 0.0, 0.0, 0.0]]),
        emb: float_tensor([[0.2, 0.1, 3e-5, -0.3], [0.2, 0.1, 3e-5, 0.1]]),
    }
    # ḡ = [.01, 0, .015, .025, 0, 0 | .2, .1, 3e-5, -.1]   (flat indices: body 0..5, embed 6..9)
    # task 1 regrow (inactive 3,4,5,7,8,9): 1 + ḡ·g_1 = [1, 1, 1 | 1.01, 1 + 9e-10 = 1.0 (float32), 0.99]
    #   → 7 first, then one of the five tied 1.0 entries {3, 4, 5, 8}; 9 never.
    # task 1 prune (active 0,1,2,6), γ=10, fisher: [1.1e-3, 4e-4, 5.4e-3, .44] → {1, 0}
    # task 0 (g_0 := ḡ): prune 11·ḡ² on actives 0..3,6..9 → lowest: 1 (0) and 8 (9.9e-9, an embedding weight)
    #   regrow: only 4 and 5 are inactive.
    new, stats = reference_prune_regrow(masks, grads, None, k=2, gamma=10.0, kind="fisher")
    assert stats["prune_indices"].tolist() == [[1, 8], [0, 1]]
    assert stats["regrow_indices"][0].tolist() == [4, 5]
    regrown1 = stats["regrow_indices"][1].tolist()
    assert 7 in regrown1 and 9 not in regrown1 and len(set(regrown1) & {3, 4, 5, 8}) == 1
    assert stats["regrow_ties"].tolist() == [2, 4]
    assert (masks[emb] & ~new[emb]).reshape(2, -1).sum(1).tolist() == [1, 0]  # flaw 2: an unmasked embedding pruned
    # the official float32 score really ties entry 8 with the zero-gradient entries, unlike float64
    assert np.float32(1) + np.float32(3e-5) * np.float32(3e-5) == np.float32(1.0)
    assert np.float64(1) + 3e-5 * 3e-5 != 1.0
    assert new[emb][1, :2].all() and not new[emb][1, 3]
    assert stats["active"].tolist() == [8, 4]


def numpy_reference(masks, grads, params, k, gamma, kind, names):
    """Independent float32 numpy re-derivation of the official scores (no ties expected)."""
    T = masks[names[0]].shape[0]
    M = np.concatenate([masks[n].reshape(T, -1).numpy() for n in names], 1).astype(np.float32)
    G = np.concatenate([grads[n].reshape(T, -1).numpy() for n in names], 1).astype(np.float32)
    gbar = G[0].copy()
    for t in range(1, T):
        gbar = gbar + G[t]
    gbar = gbar * (np.float32(1) / np.float32(T))
    G[0] = gbar
    theta = np.concatenate([params[n].reshape(-1).numpy() for n in names]).astype(np.float32)
    prune, regrow = [], []
    for t in range(T):
        agree = gbar * G[t]
        r = agree + (np.float32(1) - M[t] * np.float32(100000))
        imp = G[t] ** 2 if kind == "fisher" else np.abs(theta)
        p = (np.float32(1) - M[t]) * np.float32(100000) + agree * np.float32(gamma) + imp
        regrow.append(sorted(np.argsort(-r, kind="stable")[:k].tolist()))
        prune.append(sorted(np.argsort(p, kind="stable")[:k].tolist()))
    return prune, regrow


@pytest.mark.parametrize("kind", ["fisher", "magnitude"])
def test_reference_matches_numpy_float32(kind):
    g = torch.Generator().manual_seed(11)
    shapes = {"embed_a": (9, 4), "predict_b": (13,)}  # unmasked-in-forward params: dense gradients, no ties
    T = 6
    masks = {n: torch.rand((T, *s), generator=g) < 0.7 for n, s in shapes.items()}
    grads = {n: torch.randn((T, *s), generator=g) * 0.05 for n, s in shapes.items()}
    params = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    new, stats = reference_prune_regrow(masks, grads, params, k=3, gamma=10.0, kind=kind)
    exp_prune, exp_regrow = numpy_reference(masks, grads, params, 3, 10.0, kind, list(shapes))
    assert stats["prune_indices"].tolist() == exp_prune
    assert stats["regrow_indices"].tolist() == exp_regrow
    flat = lambda d: torch.cat([d[n].reshape(T, -1) for n in shapes], 1)  # noqa: E731
    assert torch.equal(flat(new).sum(1), flat(masks).sum(1))


def test_reference_k_zero_and_errors():
    masks = {"w": bool_tensor([[1, 1, 0], [1, 0, 0]])}
    grads = {"w": float_tensor([[0.1, 0.2, 0.0], [0.3, 0.0, 0.0]])}
    new, stats = reference_prune_regrow(masks, grads, None, k=0, gamma=10.0, kind="fisher")
    assert torch.equal(new["w"], masks["w"]) and stats["pruned"].tolist() == [0, 0]
    with pytest.raises(ValueError, match=r"k=2.*active counts \[2, 1\]"):
        reference_prune_regrow(masks, grads, None, k=2, gamma=10.0, kind="fisher")
    with pytest.raises(ValueError, match="params_all"):
        reference_prune_regrow(masks, grads, None, k=1, gamma=10.0, kind="magnitude")
    with pytest.raises(ValueError, match="kind"):
        reference_prune_regrow(masks, grads, None, k=1, gamma=10.0, kind="random")


# ---------------------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------------------


def official_k(alpha: float, eta_min: float, eta_max: float) -> int:
    """main.py's cosine_annealing, written out with numpy as the official code evaluates it."""
    return int(eta_max + 0.5 * (eta_min - eta_max) * (1 + np.cos(2 * np.pi * alpha)))


def test_prune_count_sine_official_values():
    for total in (4, 100, 1000, 1_000_000):
        ks = [prune_count(total * q // 4, total) for q in (0, 1, 2, 3, 4)]
        assert ks == [0, 50, 100, 50, 0]
    # the sin² form truncates differently at t/T = 1/4: 100·sin²(π/4) = 49.99999999999999 → 49
    assert int(100 * math.sin(math.pi / 4) ** 2) == 49
    for total in (1000, 12345):
        for t in range(0, total + 1, 7):
            assert prune_count(t, total, 0, 100) == official_k(t / total, 0, 100)
            assert prune_count(t, total, 10, 30) == official_k(t / total, 10, 30)
    assert prune_count(0, 10, eta_min=5, eta_max=20) == 5


def test_prune_count_cosine_and_validation():
    ks = [prune_count(t, 100, 0, 100, schedule="cosine") for t in range(101)]
    assert ks[0] == 100 and ks[50] == 50 and ks[100] == 0
    assert all(a >= b for a, b in zip(ks, ks[1:], strict=False))
    with pytest.raises(ValueError, match="total"):
        prune_count(0, 0)
    with pytest.raises(ValueError, match="eta"):
        prune_count(1, 10, eta_min=5, eta_max=1)
    with pytest.raises(ValueError, match="eta"):
        prune_count(1, 10, eta_min=-1, eta_max=1)
    with pytest.raises(ValueError, match="schedule"):
        prune_count(1, 10, schedule="linear")
    with pytest.raises(ValueError, match="t must"):
        prune_count(11, 10)


# ---------------------------------------------------------------------------------------------------------------
# Rule "reference" with agreement values of 1e3-1e5, where the official 1e5 offset decides the selection
# ---------------------------------------------------------------------------------------------------------------


def official_selection(masks, grads, k, gamma, prune_offset=1e5, regrow_offset=1e5):
    """The official formulas written out plainly (float64; the test values leave no near-ties). Per task i, with
    ḡ the mean gradient and task 0's gradient replaced by ḡ: regrow the k largest ḡ⊙g_i + (1 − M_i·offset), prune
    the k smallest (1 − M_i)·offset + γ·(ḡ⊙g_i) + g_i² (fisher). Returns sorted (prune, regrow) indices per task."""
    g = np.array(grads, dtype=np.float64)
    m = np.array(masks, dtype=np.float64)
    gbar = g.mean(axis=0)
    g[0] = gbar
    prune, regrow = [], []
    for i in range(len(g)):
        agreement = gbar * g[i]
        regrow_score = agreement + (1 - m[i] * regrow_offset)
        prune_score = (1 - m[i]) * prune_offset + gamma * agreement + g[i] ** 2
        regrow.append(sorted(np.argsort(-regrow_score)[:k].tolist()))
        prune.append(sorted(np.argsort(prune_score)[:k].tolist()))
    return prune, regrow


def official_is_valid(masks, selection) -> bool:
    """Whether the official update prunes only active and regrows only inactive weights (masks stay in {0, 1})."""
    prune, regrow = selection
    return all(masks[i][j] for i, row in enumerate(prune) for j in row) and not any(
        masks[i][j] for i, row in enumerate(regrow) for j in row
    )


def split(values, name_a="embed_a", name_b="predict_b"):
    """(T, 8) values as two parameters (2, 2) and (4,) (unmasked in the forward: dense gradients, no ties)."""
    t = torch.tensor(values)
    return {name_a: t[:, :4].reshape(-1, 2, 2), name_b: t[:, 4:]}


# Agreement ḡ⊙g_i of magnitude 1e3-1e5 for every task and entry (task 0: ḡ², the official in-place mean).
LARGE_GRADS = [
    [-406.0, 813.0, 725.0, -575.0, 668.0, -789.0, 486.0, -373.0],
    [-29.0, -142.0, -97.0, 123.0, -167.0, 208.0, 191.0, 225.0],
    [-282.0, 14.0, -250.0, 83.0, 191.0, -232.0, -256.0, -283.0],
]
LARGE_MASKS = [[1, 1, 0, 1, 1, 0, 0, 1], [0, 1, 1, 1, 0, 1, 1, 0], [0, 0, 1, 0, 1, 1, 1, 1]]


def test_reference_selects_as_the_official_code_with_large_agreement_values():
    """Agreement values of 1e3-1e5: the 1e5 offset still separates active from inactive weights, a smaller one would
    not (the case is built so that offsets of 1e3 or 1e4 change the official selection)."""
    gbar = np.array(LARGE_GRADS, dtype=np.float64).mean(axis=0)
    agreement = np.abs(np.stack([gbar * gbar, gbar * LARGE_GRADS[1], gbar * LARGE_GRADS[2]]))
    assert agreement.min() >= 1e3 and agreement.max() <= 1e5
    expected = official_selection(LARGE_MASKS, LARGE_GRADS, k=2, gamma=10.0)
    assert official_is_valid(LARGE_MASKS, expected)
    for offset in (1e3, 1e4):  # the offset's size matters here, for the prune and for the regrow score
        assert official_selection(LARGE_MASKS, LARGE_GRADS, 2, 10.0, prune_offset=offset)[0] != expected[0]
        assert official_selection(LARGE_MASKS, LARGE_GRADS, 2, 10.0, regrow_offset=offset)[1] != expected[1]
    masks = {n: m.bool() for n, m in split(LARGE_MASKS).items()}
    new, stats = reference_prune_regrow(masks, split(LARGE_GRADS), None, k=2, gamma=10.0, kind="fisher")
    assert stats["prune_indices"].tolist() == expected[0]
    assert stats["regrow_indices"].tolist() == expected[1]
    assert stats["regrow_ties"].tolist() == [1, 1, 1]
    flat = torch.cat([new["embed_a"].reshape(3, -1), new["predict_b"]], dim=1)
    assert flat.sum(1).tolist() == [5, 5, 5]


# ḡ = [100, 110, 200, 120]; task 1's agreement: "prune" [5e3, 2.2e3, -2e4, 3.6e3] → the inactive entry 2 scores
# 1e5 − 2e5 + 1e4 < every active one; "regrow" [-5e4, 8.8e4, -2e4, -1.8e4] → the active entry 1 scores 8.8e4 + 1 − 1e5,
# above every inactive one. With a 1e6 offset both selections would be valid.
CROSSING = {
    "prune": [[150.0, 200.0, 500.0, 210.0], [50.0, 20.0, -100.0, 30.0]],
    "regrow": [[700.0, -580.0, 500.0, 390.0], [-500.0, 800.0, -100.0, -150.0]],
}


@pytest.mark.parametrize("score", list(CROSSING))
def test_reference_refuses_what_the_official_offset_lets_cross(score):
    """Agreement values up to 1e5 with γ = 10 cross the 1e5 offset: the official code would prune an inactive (or
    regrow an active) weight, leaving masks outside {0, 1}; the reference rule says so instead of selecting."""
    masks, grads = [[1, 1, 0, 0], [1, 1, 0, 0]], CROSSING[score]
    gbar = np.array(grads).mean(axis=0)
    assert np.abs(gbar * np.array(grads[1])).min() >= 1e3 and np.abs(gbar * np.array(grads[1])).max() <= 1e5
    assert not official_is_valid(masks, official_selection(masks, grads, k=1, gamma=10.0))
    larger = {f"{score}_offset": 1e6}  # only this score crosses: with its offset raised, the selection is valid
    assert official_is_valid(masks, official_selection(masks, grads, k=1, gamma=10.0, **larger))
    with pytest.raises(RuntimeError, match="outside"):
        reference_prune_regrow(
            {"embed_w": bool_tensor(masks)}, {"embed_w": float_tensor(grads)}, None, k=1, gamma=10.0, kind="fisher"
        )
