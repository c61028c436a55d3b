"""Algorithm 1 of HarmoDT: the outer loop that learns each task's mask, stated plainly and in the paper's order.

HarmoDT (Hu et al., ICML 2024, arXiv 2405.18080) trains weights θ shared by T tasks, each task seeing them through its
own binary mask M_i (the inner loop: ordinary training steps of ``HarmoDTTrainer``). Every t_m inner steps the outer
loop moves every task's mask towards its *harmony subspace*: the weights on which the task agrees with the others.
``HarmoDTTrainer.update_masks`` runs these steps, in this order:

1. **Task gradients** ``g_i = ∇_{θ⊙M_i} L_i`` on a fresh batch of task i, with respect to the task's effective
   weights ``θ ⊙ M_i`` (dense: also where ``M_i`` is 0, which is what regrowing needs), each clipped to norm
   ``max_grad_norm`` — :func:`task_gradients`, :func:`clip_task_gradients`.
2. **Agreement score** ``A_i = ḡ ⊙ g_i`` with the mean gradient ``ḡ = (1/T) Σ_j g_j``: positive where task i pulls
   with the average — :func:`agreement_score`.
3. **Importance score** ``I_i = g_i ⊙ g_i`` (Fisher, HarmoDT-F) or ``|θ|`` (magnitude, HarmoDT-M) —
   :func:`importance_score`.
4. **Harmony score** ``H_i = γ · A_i + I_i`` — :func:`harmony_score`.
5. **Mask update**: prune the k active weights of ``M_i`` with the lowest ``H_i`` and regrow the k inactive weights
   with the highest ``A_i``; the task keeps its number of active weights — :func:`prune_and_regrow`. Steps 2-5 for
   every task, one task at a time: :func:`harmony_mask_update`.
6. **Schedule** of k over training: ``k_t = η_min + (η_max − η_min) · sin²(π t / T)``, a bell that peaks at mid
   training — :func:`prune_count`.

The steps carry the paper's terms; its equation numbers were not at hand to check, so none are quoted. Two controls
use the same schedule: :func:`random_mask_update` (the churn control, ``score="random"``: the same k, weights chosen
at random) and the official code's own numerics, flaws included (rule ``"reference"``, :mod:`.reference_rule`).

Conventions: masks are dicts ``name -> bool (T, *param_shape)``; parameters ``name -> (*param_shape)``; per-task
gradients ``name -> (T, *param_shape)``. A task's weights are all its parameters flattened in dict order, and steps
2-5 work on those flat vectors, one task at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch

from harmodt_hf.model.modeling_harmodt import HarmoDTModel

__all__ = [
    "agreement_score",
    "clip_task_gradients",
    "harmony_mask_update",
    "harmony_score",
    "importance_score",
    "prune_and_regrow",
    "prune_count",
    "random_mask_update",
    "select_prune_regrow",
    "task_gradients",
]

Masks = Mapping[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------- 1
def task_gradients(
    model: HarmoDTModel, task_loss: Callable[[int], torch.Tensor], tasks: Sequence[int] | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Step 1: every task's gradient with respect to its effective weights ``θ ⊙ M_i``, one backward pass per task.

    ``task_loss(i)`` returns task i's loss on a fresh batch of its segments. The masked layers receive each task's
    gradient with respect to ``θ ⊙ M_i`` in row i of their ``task_grad_sink`` (see ``MaskedLinear``): the plain
    gradient with respect to θ would be zero wherever ``M_i`` is, and regrowing needs the signal there. ``tasks``:
    the model's task ids to compute (default all; some of them when a run trains only some tasks).

    Returns:
        ``(grads, losses)``: ``"<layer>.weight" -> (T, out, in)`` per-task gradients and the ``(T,)`` task losses,
        rows in the order of ``tasks``.
    """
    layers = model.masked_layers()
    num_tasks = model.config.num_tasks
    tasks = list(range(num_tasks)) if tasks is None else [int(t) for t in tasks]
    grads = {
        f"{name}.weight": torch.empty(num_tasks, *layer.weight.shape, device=layer.weight.device)
        for name, layer in layers.items()
    }
    losses = torch.empty(len(tasks))
    weights = [layer.weight for layer in layers.values()]
    frozen = [weight for weight in weights if not weight.requires_grad]  # adapting with frozen weights: still the
    for weight in frozen:  # gradients with respect to them (only the masks move)
        weight.requires_grad_(True)
    for name, layer in layers.items():
        layer.task_grad_sink = grads[f"{name}.weight"]
    try:
        for row, task in enumerate(tasks):
            loss = task_loss(task)
            torch.autograd.grad(loss, weights, allow_unused=True)  # fills row `task` of every sink
            losses[row] = loss.item()
    finally:
        for layer in layers.values():
            layer.task_grad_sink = None
        for weight in frozen:
            weight.requires_grad_(False)
    if tasks != list(range(num_tasks)):  # the rows of the tasks computed, in their order
        grads = {name: g[tasks] for name, g in grads.items()}
    return grads, losses


def clip_task_gradients(task_grads: Masks, max_norm: float) -> None:
    """Step 1, clipping: scale each task's gradient (over all parameters) in place to norm ≤ ``max_norm``
    (``max_norm`` ≤ 0: no clipping)."""
    if max_norm <= 0:
        return
    num_tasks = _num_tasks(task_grads)
    squares = sum(torch.linalg.vector_norm(g.reshape(num_tasks, -1), dim=1) ** 2 for g in task_grads.values())
    scale = (max_norm / (torch.sqrt(squares) + 1e-6)).clamp(max=1.0)
    for g in task_grads.values():
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))


# ---------------------------------------------------------------------------------------------------------------- 2-4
def agreement_score(mean_grad: torch.Tensor, task_grad: torch.Tensor) -> torch.Tensor:
    """Step 2: ``A_i = ḡ ⊙ g_i``, positive where task i pulls with the mean gradient ``ḡ``."""
    return mean_grad * task_grad


def importance_score(
    task_grad: torch.Tensor, theta: torch.Tensor | None, kind: Literal["fisher", "magnitude"]
) -> torch.Tensor:
    """Step 3: ``I_i = g_i ⊙ g_i`` (``"fisher"``) or ``|θ|`` (``"magnitude"``, the same for every task)."""
    if kind == "fisher":
        return task_grad * task_grad
    if kind != "magnitude":
        raise ValueError(f'importance kind must be "fisher" or "magnitude", got {kind!r}')
    if theta is None:
        raise ValueError('importance kind "magnitude" needs the parameters θ')
    return theta.abs()


def harmony_score(agreement: torch.Tensor, importance: torch.Tensor, gamma: float) -> torch.Tensor:
    """Step 4: ``H_i = γ · A_i + I_i``: the lowest active weights are pruned."""
    return importance.add(agreement, alpha=gamma)


# ---------------------------------------------------------------------------------------------------------------- 5
def prune_and_regrow(
    mask: torch.Tensor, prune_score: torch.Tensor, regrow_score: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 5 for one task: prune the k active weights with the lowest ``prune_score`` and regrow the k inactive
    weights with the highest ``regrow_score`` (all 1-D, one entry per weight).

    Regrow candidates are the weights inactive *before* the update, so a weight pruned now is not regrown now and
    the task keeps its number of active weights. Among equal scores ``torch.topk`` decides. Returns the new mask and
    the ascending indices pruned and regrown.
    """
    active, inactive = mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)
    if k > min(len(active), len(inactive)):
        raise ValueError(f"k={k} exceeds the task's active ({len(active)}) or inactive ({len(inactive)}) count")
    pruned = active[torch.topk(prune_score[active], k, largest=False).indices].sort().values
    regrown = inactive[torch.topk(regrow_score[inactive], k, largest=True).indices].sort().values
    new = mask.clone()
    new[pruned] = False
    new[regrown] = True
    return new, pruned, regrown


def harmony_mask_update(
    masks: Masks,
    task_grads: Masks,
    params: Mapping[str, torch.Tensor] | None,
    k: int,
    gamma: float,
    kind: Literal["fisher", "magnitude"],
) -> tuple[dict, dict]:
    """Steps 2-5 for every task, on (clipped) task gradients: its scores, then prune and regrow k weights. One task's
    scores at a time, over all its weights (parameters flattened in dict order).

    Args:
        masks: name -> bool ``(T, *shape)``, the current task masks.
        task_grads: name -> ``(T, *shape)`` task gradients (step 1); must be finite.
        params: name -> parameter θ, needed for ``kind="magnitude"``.
        k: weights pruned and regrown per task (:func:`prune_count`).
        gamma: weight γ of the agreement in the harmony score.
        kind: importance, ``"fisher"`` or ``"magnitude"``.

    Returns:
        ``(new_masks, stats)`` as :func:`select_prune_regrow`.
    """
    _check_layout(masks, task_grads, "task_grads")
    for name, g in task_grads.items():
        if not g.is_floating_point() or not bool(torch.isfinite(g.sum())):
            raise ValueError(f"task_grads[{name!r}] must be finite floating point gradients")
    if kind not in ("fisher", "magnitude"):
        raise ValueError(f'importance kind must be "fisher" or "magnitude", got {kind!r}')
    theta = None
    if kind == "magnitude":
        if params is None or any(name not in params for name in masks):
            raise ValueError('importance kind "magnitude" needs params for every masked parameter')
        theta = torch.cat([params[name].detach().reshape(-1) for name in masks])
    mean_grad = torch.cat([task_grads[name].mean(dim=0).reshape(-1) for name in masks])  # ḡ

    def scores(task: int) -> tuple[torch.Tensor, torch.Tensor]:
        task_grad = _flat_row(task_grads, task, masks)  # g_i
        agreement = agreement_score(mean_grad, task_grad)
        importance = importance_score(task_grad, theta, kind)
        return harmony_score(agreement, importance, gamma), agreement  # prune by H_i, regrow by A_i

    return _update_every_task(masks, scores, k)


def select_prune_regrow(masks: Masks, prune_scores: Masks, regrow_scores: Masks, k: int) -> tuple[dict, dict]:
    """Step 5 for every task on given scores (name -> float ``(T, *shape)``; NaN is an error).

    Returns:
        ``(new_masks, stats)``: new bool masks (the inputs are untouched) and ``(T,)`` int64 tensors ``pruned``,
        ``regrown``, ``active`` and ``(T, k)`` ascending flat indices ``prune_indices``, ``regrow_indices`` (into a
        task's parameters flattened in dict order).
    """
    _check_layout(masks, prune_scores, "prune_scores")
    _check_layout(masks, regrow_scores, "regrow_scores")
    for what, scores in (("prune_scores", prune_scores), ("regrow_scores", regrow_scores)):
        for name, tensor in scores.items():
            if not tensor.is_floating_point() or _has_nan(tensor):
                raise ValueError(f"{what}[{name!r}] must be floating point without NaN")
    return _update_every_task(
        masks, lambda task: (_flat_row(prune_scores, task, masks), _flat_row(regrow_scores, task, masks)), k
    )


def random_mask_update(masks: Masks, k: int, generator: torch.Generator) -> tuple[dict, dict]:
    """The churn control (``score="random"``): step 5 with independent uniform random prune and regrow scores, so it
    moves exactly as many weights per task as the harmony rule at the same k, chosen at random."""
    prune, regrow = {}, {}
    for name, mask in masks.items():
        noise = torch.rand((2, *mask.shape), generator=generator, device=generator.device).to(mask.device)
        prune[name], regrow[name] = noise[0], noise[1]
    return select_prune_regrow(masks, prune, regrow, k)


# ---------------------------------------------------------------------------------------------------------------- 6
def prune_count(
    t: int,
    total: int,
    eta_min: float = 0,
    eta_max: float = 100,
    schedule: Literal["sine", "cosine"] = "sine",
) -> int:
    """Step 6: the number k of weights pruned (and regrown) per task at outer update t of ``total``.

    * ``"sine"`` (the paper's and official ``main.py``'s): a bell 0 → η_max at t = T/2 → 0, computed as the official
      expression ``int(η_max + 0.5·(η_min − η_max)·(1 + cos(2π·t/T)))``. In exact arithmetic that is
      ``η_min + (η_max − η_min)·sin²(π·t/T)``, but ``int()`` truncates and the two float forms differ (at t/T = 1/4
      the official form gives 50 where ``100·sin²(π/4)`` = 49.999… gives 49): we keep the official one. The official
      code passes the 0-based iteration as t and ``max_iters`` as ``total``.
    * ``"cosine"``: a monotone decay ``int(η_min + 0.5·(η_max − η_min)·(1 + cos(π·t/T)))`` from η_max to η_min.
    """
    if total <= 0:
        raise ValueError(f"total must be > 0, got {total}")
    if not 0 <= t <= total:
        raise ValueError(f"t must be in [0, total={total}], got {t}")
    if not 0 <= eta_min <= eta_max:
        raise ValueError(f"need 0 <= eta_min <= eta_max, got eta_min={eta_min}, eta_max={eta_max}")
    alpha = t / total
    if schedule == "sine":
        return int(eta_max + 0.5 * (eta_min - eta_max) * (1 + math.cos(2 * math.pi * alpha)))
    if schedule == "cosine":
        return int(eta_min + 0.5 * (eta_max - eta_min) * (1 + math.cos(math.pi * alpha)))
    raise ValueError(f'schedule must be "sine" or "cosine", got {schedule!r}')


# ------------------------------------------------------------------------------------------------------------ helpers
def _update_every_task(masks: Masks, scores: Callable[[int], tuple[torch.Tensor, torch.Tensor]], k: int):
    """Step 5 task by task, ``scores(task)`` giving the task's flat prune and regrow scores; new masks and stats."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    num_tasks = _num_tasks(masks)
    rows, pruned, regrown = [], [], []
    for task in range(num_tasks):
        mask = _flat_row(masks, task, masks).bool()
        try:
            row, task_pruned, task_regrown = prune_and_regrow(mask, *scores(task), k)
        except ValueError as error:
            counts = [int(_flat_row(masks, t, masks).sum()) for t in range(num_tasks)]
            raise ValueError(
                f"{error} (task {task}): active counts {counts}, inactive counts "
                f"{[mask.numel() - c for c in counts]} (of {mask.numel()} weights per task)"
            ) from None
        rows.append(row)
        pruned.append(task_pruned)
        regrown.append(task_regrown)
    rows = torch.stack(rows)
    counts = torch.full((num_tasks,), k, dtype=torch.int64)
    stats = {
        "pruned": counts,
        "regrown": counts.clone(),
        "active": rows.view(torch.uint8).sum(dim=1, dtype=torch.int64),
        "prune_indices": torch.stack(pruned),
        "regrow_indices": torch.stack(regrown),
    }
    return _unflatten(rows, masks), stats


def _num_tasks(tensors: Masks) -> int:
    """The common leading (task) dimension of a non-empty dict of tensors."""
    sizes = {t.shape[0] if t.dim() else None for t in tensors.values()}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"expected a non-empty dict of tensors with one leading task dimension, got sizes {sizes}")
    return int(sizes.pop())


def _check_layout(reference: Masks, other: Masks, what: str) -> None:
    for name, tensor in reference.items():
        if name not in other:
            raise ValueError(f"{what} lacks {name!r}")
        if tuple(other[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{what}[{name!r}] has shape {tuple(other[name].shape)}, expected {tuple(tensor.shape)}")


def _flat_row(tensors: Masks, task: int, order: Masks) -> torch.Tensor:
    """Task ``task``'s entries of every tensor, flattened and concatenated in the key order of ``order``."""
    return torch.cat([tensors[name][task].reshape(-1) for name in order])


def _unflatten(rows: torch.Tensor, like: Masks) -> dict[str, torch.Tensor]:
    """``(T, N)`` rows split back into tensors shaped as ``like``'s (the inverse of :func:`_flat_row` per task)."""
    sizes = [t[0].numel() for t in like.values()]
    parts = rows.split(sizes, dim=1)
    return {name: part.reshape(t.shape) for (name, t), part in zip(like.items(), parts, strict=True)}


def _has_nan(scores: torch.Tensor) -> bool:
    """Whether ``scores`` hold a NaN; one pass (a sum) unless the sum is not finite."""
    return not bool(torch.isfinite(scores.sum())) and bool(torch.isnan(scores).any())
