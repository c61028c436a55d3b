"""The mask update of the outer loop as pure tensor functions: scores, prune/regrow selection, the η schedule.

* scores: :func:`agreement_scores`, :func:`importance_scores`, :func:`harmony_scores`;
* selection: :func:`select_prune_regrow` (the intended algorithm, rule ``"harmony"``; fused with the scores in
  :func:`harmony_prune_regrow`) and :func:`reference_prune_regrow` (the official numerics, flaws included, rule
  ``"reference"``);
* the η schedule :func:`prune_count`.

Conventions as in :mod:`harmodt_hf.model.masks`: masks are dicts ``name -> bool tensor (num_tasks, *param_shape)``;
parameters are dicts ``name -> tensor (*param_shape)``; per-task gradients and scores are dicts ``name -> tensor
(num_tasks, *param_shape)``. Selection is global over all parameters of a dict, in the dict's iteration order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from typing import Literal

import torch

from harmodt_hf.model.masks import _check_same_layout, _num_tasks, _row_counts

__all__ = [
    "agreement_scores",
    "harmony_prune_regrow",
    "harmony_scores",
    "importance_scores",
    "prune_count",
    "random_prune_regrow",
    "reference_prune_regrow",
    "select_prune_regrow",
]


# ----------------------------------------------------------------------------------------------------------------
# Scores (rule "harmony")
# ----------------------------------------------------------------------------------------------------------------


def agreement_scores(task_grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Agreement of each task's gradient with the mean gradient: ``ḡ ⊙ g_i``, ḡ = mean over tasks (dim 0).

    Args:
        task_grads: name -> per-task gradients ``(T, *shape)``.

    Returns:
        name -> ``(T, *shape)`` scores (positive where task i pulls with the average).
    """
    _num_tasks(task_grads, "task_grads")
    return {name: g.mean(dim=0, keepdim=True) * g for name, g in task_grads.items()}


def importance_scores(
    task_grads: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor] | None,
    kind: Literal["fisher", "magnitude"],
) -> dict[str, torch.Tensor]:
    """Importance of each weight for each task: ``g_i²`` (``"fisher"``) or ``|θ|`` (``"magnitude"``).

    Args:
        task_grads: name -> per-task gradients ``(T, *shape)``.
        params: name -> parameter ``(*shape)``; only needed for ``"magnitude"``.
        kind: ``"fisher"`` or ``"magnitude"``.

    Returns:
        name -> ``(T, *shape)``; for ``"magnitude"`` an expanded (non-materialised) view of ``|θ|``.
    """
    num_tasks = _num_tasks(task_grads, "task_grads")
    if kind == "fisher":
        return {name: g * g for name, g in task_grads.items()}
    if kind == "magnitude":
        if params is None:
            raise ValueError('importance kind "magnitude" needs params')
        out = {}
        for name, g in task_grads.items():
            if name not in params:
                raise ValueError(f"params lacks {name!r}, needed for magnitude importance")
            theta = params[name]
            if tuple(theta.shape) != tuple(g.shape[1:]):
                raise ValueError(f"params[{name!r}] has shape {tuple(theta.shape)}, expected {tuple(g.shape[1:])}")
            out[name] = theta.detach().abs().unsqueeze(0).expand(num_tasks, *theta.shape)
        return out
    raise ValueError(f'importance kind must be "fisher" or "magnitude", got {kind!r}')


def harmony_scores(
    agreement: Mapping[str, torch.Tensor], importance: Mapping[str, torch.Tensor], gamma: float
) -> dict[str, torch.Tensor]:
    """Prune score of the harmony rule: ``γ · agreement + importance`` (the lowest active entries are pruned).

    Computed as ``importance.add(agreement, alpha=γ)``, the same kernel :func:`harmony_prune_regrow` uses, so both
    give bit-identical scores."""
    _check_same_layout(agreement, importance, "importance")
    return {name: importance[name].add(a, alpha=gamma) for name, a in agreement.items()}


# ----------------------------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------------------------


def _check_k(k: int, active: torch.Tensor, total: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    inactive = total - active
    if k > int(active.min()) or k > int(inactive.min()):
        raise ValueError(
            f"k={k} exceeds a task's active or inactive count: active counts {active.tolist()}, "
            f"inactive counts {inactive.tolist()} (of {total} weights per task)"
        )


def select_prune_regrow(
    masks: Mapping[str, torch.Tensor],
    prune_scores: Mapping[str, torch.Tensor],
    regrow_scores: Mapping[str, torch.Tensor],
    k: int,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Rule ``"harmony"``: per task, prune the k active weights with the lowest prune score and regrow the k
    inactive weights with the highest regrow score.

    Selection is global over all parameters in ``masks`` (flattened in dict order) and by exact index: inactive
    entries are excluded from pruning (+inf) and active ones from regrowing (-inf); each parameter gives its k best
    candidates per task and one ``topk`` over those candidates picks the k best overall (the same set as one ``topk``
    over all ``(T, N)`` scores, without ever concatenating them). Regrow candidates are the weights inactive *before*
    the update, so a just-pruned weight is never regrown in the same step, and every task's active count stays
    exactly the same. Entries whose own score is ±inf cannot be confused with excluded ones: such (rare) tasks fall
    back to an exact per-task selection.

    Args:
        masks: name -> bool ``(T, *shape)``.
        prune_scores: name -> ``(T, *shape)`` float, e.g. :func:`harmony_scores`; NaN is an error.
        regrow_scores: name -> ``(T, *shape)`` float, e.g. :func:`agreement_scores`; NaN is an error.
        k: weights pruned and regrown per task (≥ 0). ``ValueError`` if it exceeds a task's active or inactive count.

    Returns:
        ``(new_masks, stats)``: new bool masks (new tensors; inputs untouched) and a dict with ``(T,)`` int64 tensors
        ``pruned``, ``regrown``, ``active``; ``(T, k)`` flat indices ``prune_indices``, ``regrow_indices`` (into the
        concatenation of the flattened parameters, ascending); ``pruned_per_param`` / ``regrown_per_param``:
        name -> ``(T,)`` counts.
    """
    _check_same_layout(masks, prune_scores, "prune_scores")
    _check_same_layout(masks, regrow_scores, "regrow_scores")
    for what, scores in (("prune_scores", prune_scores), ("regrow_scores", regrow_scores)):
        for tensor in scores.values():
            if not tensor.is_floating_point():
                raise ValueError(f"{what} must be floating point, got {tensor.dtype}")
            if _has_nan(tensor):
                raise ValueError(f"{what} contain NaN")

    def layer_scores(name: str, mask: torch.Tensor, prune_out, regrow_out) -> tuple[torch.Tensor, torch.Tensor]:
        num_tasks = mask.shape[0]
        prune = prune_out.copy_(prune_scores[name].reshape(num_tasks, -1))
        return prune, regrow_out.copy_(regrow_scores[name].reshape(num_tasks, -1))

    def exact_rows(task: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _cat_row(prune_scores, task), _cat_row(regrow_scores, task)

    dtype = _common_dtype([*prune_scores.values(), *regrow_scores.values()])
    return _select_by_layer(masks, k, layer_scores, exact_rows, dtype)


def harmony_prune_regrow(
    masks: Mapping[str, torch.Tensor],
    task_grads: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor] | None,
    k: int,
    gamma: float,
    kind: Literal["fisher", "magnitude"],
    overwrite_grads: bool = False,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The whole harmony update in one pass over the parameters: scores, then :func:`select_prune_regrow`.

    Gives exactly ``select_prune_regrow(masks, harmony_scores(a, importance_scores(g, params, kind), gamma), a, k)``
    with ``a = agreement_scores(g)``, but scores one parameter at a time and never concatenates all tasks' scores;
    with ``overwrite_grads=True`` each gradient tensor is reused as that parameter's agreement buffer (its content
    is lost), which saves a ``(T, *shape)`` allocation per parameter. Non-finite gradients are an error (the scores
    would be meaningless).
    """
    if kind not in ("fisher", "magnitude"):
        raise ValueError(f'importance kind must be "fisher" or "magnitude", got {kind!r}')
    if kind == "magnitude" and params is None:
        raise ValueError('importance kind "magnitude" needs params')
    _check_same_layout(masks, task_grads, "task_grads")

    grads_dtype = _common_dtype(task_grads.values())
    if not grads_dtype.is_floating_point:
        raise ValueError(f"task_grads must be floating point gradients, got {grads_dtype}")

    def layer_scores(name: str, mask: torch.Tensor, prune_out, regrow_out) -> tuple[torch.Tensor, torch.Tensor]:
        num_tasks = mask.shape[0]
        grads = task_grads[name].reshape(num_tasks, -1)
        if not grads.is_floating_point() or not torch.isfinite(grads.sum()):
            raise ValueError(f"task_grads[{name!r}] must be finite floating point gradients")
        agreement = grads if overwrite_grads and grads.dtype == grads_dtype else regrow_out.copy_(grads)
        mean = agreement.mean(dim=0, keepdim=True)
        if kind == "fisher":
            prune = torch.mul(agreement, agreement, out=prune_out)
        else:
            if name not in params:
                raise ValueError(f"params lacks {name!r}, needed for magnitude importance")
            prune = prune_out.copy_(params[name].detach().abs().reshape(1, -1).expand(num_tasks, -1))
        agreement.mul_(mean)  # ḡ ⊙ g_i, the same product as agreement_scores
        return prune.add_(agreement, alpha=gamma), agreement

    return _select_by_layer(masks, k, layer_scores, None, grads_dtype)


def random_prune_regrow(
    masks: Mapping[str, torch.Tensor], k: int, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], dict]:
    """The churn control (``score="random"``): per task, prune k active and regrow k inactive weights chosen
    uniformly at random — the same counts and schedule as the harmony rule, without its scores.

    It is :func:`select_prune_regrow` with independent uniform random prune and regrow scores, so it moves exactly
    as many weights per task as the harmony rule would at the same k."""
    scores = {}
    for name, mask in masks.items():
        noise = torch.rand((2, *mask.shape), generator=generator, device=generator.device)
        scores[name] = noise.to(mask.device)
    prune = {name: s[0] for name, s in scores.items()}
    regrow = {name: s[1] for name, s in scores.items()}
    return select_prune_regrow(masks, prune, regrow, k)


def _has_nan(scores: torch.Tensor) -> bool:
    """NaN test that reads the tensor once (a sum); the elementwise test runs only if the sum is not finite."""
    return not bool(torch.isfinite(scores.sum())) and bool(torch.isnan(scores).any())


def _cat_row(tensors: Mapping[str, torch.Tensor], task: int) -> torch.Tensor:
    return torch.cat([t[task].reshape(-1) for t in tensors.values()])


def _common_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def _select_by_layer(masks, k, layer_scores, exact_rows, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """Selection engine of the harmony rule, one parameter at a time.

    ``layer_scores(name, mask, prune_out, regrow_out)`` returns a parameter's ``(T, n)`` prune and regrow scores,
    which are overwritten here: written into the two ``dtype`` work buffers it is given (reused from parameter to
    parameter: fresh large allocations cost page faults on every first touch) or into tensors it owns.
    ``exact_rows(task)`` returns that task's full flat score rows for the rare exact fallback (``None``: an infinite
    score on a selected candidate is an error instead).
    """
    names, flat, offsets, active = _layout(masks)
    num_tasks = active.shape[0]
    _check_k(k, active, sum(f.shape[1] for f in flat.values()))
    device = active.device
    if k == 0:
        empty = torch.empty(num_tasks, 0, dtype=torch.int64, device=device)
        return _apply_layer_selection(masks, flat, offsets, active, empty, empty)

    prune_cands: list[tuple[torch.Tensor, torch.Tensor]] = []
    regrow_cands: list[tuple[torch.Tensor, torch.Tensor]] = []
    size = num_tasks * max(f.shape[1] for f in flat.values())
    prune_buf, regrow_buf, penalty_buf = torch.empty(3, size, dtype=dtype, device=device).unbind(0)
    for name, offset in zip(names, offsets, strict=True):
        mask = flat[name]
        shape = mask.shape
        work = (buf[: mask.numel()].view(shape) for buf in (prune_buf, regrow_buf))
        prune, regrow = layer_scores(name, masks[name], *work)
        # -inf where active, +inf where inactive: max/min exclude entries in one vectorised pass each (on CPU several
        # times faster than masked_fill_); scores hold no NaN (checked), so nothing else changes.
        penalty = penalty_buf[: mask.numel()].view(shape).copy_(mask.view(torch.uint8)).sub_(0.5).mul_(-math.inf)
        torch.maximum(prune, penalty, out=prune)  # inactive: +inf, never pruned
        torch.minimum(regrow, penalty, out=regrow)  # active: -inf, never regrown
        kk = min(k, mask.shape[1])
        values, indices = _row_topk(prune, kk, largest=False)
        prune_cands.append((values, indices + offset))
        values, indices = _row_topk(regrow, kk, largest=True)
        regrow_cands.append((values, indices + offset))
        del prune, regrow
    prune_idx = _best_candidates(prune_cands, k, largest=False)
    regrow_idx = _best_candidates(regrow_cands, k, largest=True)

    bad = ~_gather_flat(flat, offsets, prune_idx).all(dim=1) | _gather_flat(flat, offsets, regrow_idx).any(dim=1)
    bad_tasks = bad.nonzero().flatten().tolist()
    if bad_tasks and exact_rows is None:
        raise ValueError(f"infinite scores on selection candidates for tasks {bad_tasks}")
    for task in bad_tasks:  # scores of ±inf on candidates: select among candidates exactly
        row_mask = torch.cat([flat[n][task] for n in names])
        prune_row, regrow_row = exact_rows(task)
        on, off = row_mask.nonzero().flatten(), (~row_mask).nonzero().flatten()
        prune_idx[task] = on[torch.topk(prune_row[on], k, largest=False).indices]
        regrow_idx[task] = off[torch.topk(regrow_row[off], k, largest=True).indices]
    return _apply_layer_selection(masks, flat, offsets, active, prune_idx, regrow_idx)


def _layout(masks: Mapping[str, torch.Tensor]):
    """``(names, flat, offsets, active)``: the parameters in dict order, each mask as bool ``(T, n)``, each
    parameter's offset in the concatenated flat index, and every task's active count."""
    names = list(masks)
    num_tasks = _num_tasks(masks, "masks")
    flat = {n: masks[n].reshape(num_tasks, -1).to(torch.bool) for n in names}
    sizes = [flat[n].shape[1] for n in names]
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()[:-1]]
    active = sum(_row_counts(flat[n]) for n in names)
    return names, flat, offsets, active


def _row_topk(scores: torch.Tensor, k: int, largest: bool, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1, largest=largest)`` for ``(T, n)`` rows much longer than ``k``, in about one
    vectorised read instead of a sort-based scan: rows are cut into blocks of ``block`` entries, the k blocks with the
    best entry are kept (the row's k best entries all lie in them), and ``topk`` runs on those ``k * block`` entries.
    The values are exactly ``torch.topk``'s; among equal values the indices may differ (as ``topk`` leaves open)."""
    num_rows, n = scores.shape
    if n % block or n < 4 * block * k:
        return torch.topk(scores, k, dim=1, largest=largest)
    blocks = scores.view(num_rows, n // block, block)
    best = blocks.amax(dim=2) if largest else blocks.amin(dim=2)
    kept = torch.topk(best, k, dim=1, largest=largest).indices  # (T, k) block numbers
    candidates = blocks.gather(1, kept.unsqueeze(2).expand(-1, -1, block)).reshape(num_rows, k * block)
    values, position = torch.topk(candidates, k, dim=1, largest=largest)
    return values, kept.gather(1, position // block) * block + position % block


def _best_candidates(cands: list[tuple[torch.Tensor, torch.Tensor]], k: int, largest: bool) -> torch.Tensor:
    """The k best of the per-parameter candidates, as flat indices ``(T, k)``."""
    values = torch.cat([v for v, _ in cands], dim=1)
    indices = torch.cat([i for _, i in cands], dim=1)
    return indices.gather(1, torch.topk(values, k, dim=1, largest=largest).indices)


def _gather_flat(flat: dict[str, torch.Tensor], offsets: list[int], idx: torch.Tensor) -> torch.Tensor:
    """``cat(flat.values(), dim=1).gather(1, idx)`` without the concatenation."""
    out = torch.zeros(idx.shape, dtype=torch.bool, device=idx.device)
    for mask, offset in zip(flat.values(), offsets, strict=True):
        inside = (idx >= offset) & (idx < offset + mask.shape[1])
        local = (idx - offset).clamp(0, mask.shape[1] - 1)
        out |= inside & mask.gather(1, local)
    return out


def _apply_layer_selection(masks, flat, offsets, active, prune_idx, regrow_idx) -> tuple[dict[str, torch.Tensor], dict]:
    """New masks (per parameter) with the selected entries flipped, and the statistics of the update."""
    num_tasks = prune_idx.shape[0]
    pruned = _row_counts(_gather_flat(flat, offsets, prune_idx))
    regrown = _row_counts(~_gather_flat(flat, offsets, regrow_idx))
    rows = torch.arange(num_tasks, device=prune_idx.device)[:, None]
    new_masks, pruned_per_param, regrown_per_param = {}, {}, {}
    for (name, mask), offset in zip(flat.items(), offsets, strict=True):
        n = mask.shape[1]
        new = mask.clone()
        for idx, value, per_param in ((prune_idx, False, pruned_per_param), (regrow_idx, True, regrown_per_param)):
            inside = (idx >= offset) & (idx < offset + n)
            new.view(-1)[(rows * n + idx - offset)[inside]] = value
            per_param[name] = inside.sum(dim=1)
        new_masks[name] = new.reshape(masks[name].shape)
    stats = {
        "pruned": pruned,
        "regrown": regrown,
        "active": active - pruned + regrown,
        "prune_indices": prune_idx.sort(dim=1).values,
        "regrow_indices": regrow_idx.sort(dim=1).values,
        "pruned_per_param": pruned_per_param,
        "regrown_per_param": regrown_per_param,
    }
    return new_masks, stats


def _gather_row(tensors: Mapping[str, torch.Tensor], names: list[str], task: int, out: torch.Tensor) -> torch.Tensor:
    """Copy row ``task`` of every ``(T, *shape)`` tensor, flattened in ``names`` order, into ``out`` (N,)."""
    offset = 0
    for name in names:
        row = tensors[name][task].reshape(-1)
        out[offset : offset + row.numel()].copy_(row)
        offset += row.numel()
    if offset != out.numel():
        raise ValueError(f"gradients hold {offset} entries per task, masks {out.numel()}")
    return out


def _official_mean_gradient(flat_grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """ḡ as ``get_harmo_gradient`` computes it on CUDA: a sequential float32 sum in task order into the first
    buffer, then ``/= T``, which CUDA evaluates for a Python-scalar divisor as ``x * float32(1/T)``."""
    total: torch.Tensor | None = None
    count = 0
    for g in flat_grads:
        total = g.to(torch.float32).clone() if total is None else total.add_(g.to(torch.float32))
        count += 1
    if total is None:
        raise ValueError("no task gradients")
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(count), dtype=torch.float32)
    return total.mul_(inv.to(total.device))


def reference_prune_regrow(
    masks_all: Mapping[str, torch.Tensor],
    task_grads_all: Mapping[str, torch.Tensor],
    params_all: Mapping[str, torch.Tensor] | None,
    k: int,
    gamma: float,
    kind: Literal["fisher", "magnitude"],
) -> tuple[dict[str, torch.Tensor], dict]:
    """Rule ``"reference"``: the official mask update, its float32 numerics and flaws reproduced on purpose.

    Mirrors ``main.py`` + ``prompt_dt/fl_utils.py`` of charleshsc/HarmoDT (``get_harmo_gradient``,
    ``mask_dead_harmo`` = regrow, ``mask_generate_harmo`` = prune). Per task i, over one float32 vector holding
    *all* parameters (dict order = the model's ``named_parameters`` order, embeddings and heads included although
    the forward pass never masks them):

    * ḡ: task gradients summed in task order into task 0's buffer, then divided by T the way the CUDA kernel
      divides by a Python scalar (multiplication by the float32 reciprocal ``1/T``).
    * regrow score ``ḡ⊙g_i + (1 − M_i·1e5)``: the k largest are regrown.
    * prune score ``(1 − M_i)·1e5 + (ḡ⊙g_i)·γ + imp``, ``imp = g_i²`` (fisher) or ``|θ|`` (magnitude): the k
      smallest are pruned. Both use ``torch.topk`` on the whole vector; ``M_new = M − pruned + regrown``.

    Known flaws kept (REFERENCE.md "Known flaws"):

    1. Regrow is tie-breaking: at inactive body weights the masked g_i is 0, so the score is exactly
       ``0 + 1 = 1.0`` in float32 (as is any ``ḡ⊙g_i`` below ~6e-8); which tied entries ``topk`` returns depends on
       the implementation (CPU and CUDA may differ), so only scores and untied choices are reproduced exactly.
       ``stats["regrow_ties"]`` counts the inactive entries tied with the k-th regrow score.
    2. Prune and regrow also land on embedding/head parameters, which the forward pass does not mask.
    3. The in-place mean: task 0's gradient buffer *becomes* ḡ, so task 0 is scored with ``g_0 := ḡ``.

    Args:
        masks_all: name -> bool ``(T, *shape)`` for every parameter of the model.
        task_grads_all: name -> ``(T, *shape)`` per-task gradients **as the official code computes them**: batch
            gradient, clipped to norm 0.25, then multiplied by the task's mask except for parameters whose name
            contains ``embed`` or ``predict`` (zeros for parameters without a gradient). Cast to float32.
        params_all: name -> current (unmasked) parameter; needed for ``kind="magnitude"``.
        k: weights pruned and regrown per task (``ValueError`` if it exceeds a task's active or inactive count).
        gamma: weight of the agreement term in the prune score (official default 10).
        kind: ``"fisher"`` or ``"magnitude"``.

    Returns:
        ``(new_masks, stats)`` as :func:`select_prune_regrow`, plus ``stats["regrow_ties"]`` (``(T,)`` int64).
        ``RuntimeError`` if the official scores would select an inactive weight to prune or an active one to regrow
        (the official code would then produce masks outside {0, 1}).
    """
    if kind not in ("fisher", "magnitude"):
        raise ValueError(f'importance kind must be "fisher" or "magnitude", got {kind!r}')
    _num_tasks(masks_all, "masks_all")
    _check_same_layout(masks_all, task_grads_all, "task_grads_all")
    names, flat, offsets, active = _layout(masks_all)
    num_tasks = active.shape[0]
    flat_masks = torch.cat(list(flat.values()), dim=1)
    _check_k(k, active, flat_masks.shape[1])
    device = flat_masks.device
    if k == 0:
        empty = torch.empty(num_tasks, 0, dtype=torch.int64, device=device)
        new_masks, stats = _apply_layer_selection(masks_all, flat, offsets, active, empty, empty)
        stats["regrow_ties"] = torch.zeros(num_tasks, dtype=torch.int64, device=device)
        return new_masks, stats

    total = flat_masks.shape[1]
    # Preallocated float32 work buffers, reused for every task (fresh large allocations page-fault on every task).
    g_buf, m_buf, agree, regrow_score, prune_score, tmp = (
        torch.empty(total, dtype=torch.float32, device=device) for _ in range(6)
    )

    def task_grad(task: int) -> torch.Tensor:
        return _gather_row(task_grads_all, names, task, g_buf)

    gbar = _official_mean_gradient(task_grad(task) for task in range(num_tasks))

    theta_abs = None
    if kind == "magnitude":
        if params_all is None:
            raise ValueError('importance kind "magnitude" needs params_all')
        missing = [n for n in names if n not in params_all]
        if missing:
            raise ValueError(f"params_all lacks {missing[:5]}")
        theta_abs = torch.cat([params_all[n].detach().reshape(-1) for n in names]).to(torch.float32).abs()

    prune_idx = torch.empty(num_tasks, k, dtype=torch.int64, device=device)
    regrow_idx = torch.empty(num_tasks, k, dtype=torch.int64, device=device)
    ties = torch.zeros(num_tasks, dtype=torch.int64, device=device)
    for task in range(num_tasks):
        g = gbar if task == 0 else task_grad(task)  # flaw 3: task 0's buffer holds the mean
        m_buf.copy_(flat_masks[task])
        torch.mul(gbar, g, out=agree)
        # regrow: ḡ⊙g_i + (1 − M·1e5)   (float addition is commutative, so the order of the sum is immaterial)
        torch.mul(m_buf, 100000, out=regrow_score)
        regrow_score.neg_().add_(1)  # 1 − x ≡ 1 + (−x) exactly in IEEE arithmetic
        regrow_score.add_(agree)
        # prune: ((1 − M)·1e5 + (ḡ⊙g_i)·γ) + importance, each step rounded to float32 as in the official code
        torch.neg(m_buf, out=prune_score).add_(1)
        prune_score.mul_(100000)
        prune_score.add_(torch.mul(agree, gamma, out=tmp))
        prune_score.add_(torch.mul(g, g, out=tmp) if theta_abs is None else theta_abs)
        top = torch.topk(regrow_score, k, largest=True)
        regrow_idx[task] = top.indices
        # entries tied with the k-th regrow score (only inactive ones can reach it when the selection is valid)
        ties[task] = torch.count_nonzero(regrow_score == top.values[-1])
        prune_idx[task] = torch.topk(prune_score, k, largest=False).indices

    if ~flat_masks.gather(1, prune_idx).all() or flat_masks.gather(1, regrow_idx).any():
        raise RuntimeError(
            "official scores selected an inactive weight to prune or an active weight to regrow "
            "(scores beyond the 1e5 offset); the official update would leave masks outside {0, 1}"
        )
    new_masks, stats = _apply_layer_selection(masks_all, flat, offsets, active, prune_idx, regrow_idx)
    stats["regrow_ties"] = ties
    return new_masks, stats


# ----------------------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------------------


def prune_count(
    t: int,
    total: int,
    eta_min: float = 0,
    eta_max: float = 100,
    schedule: Literal["sine", "cosine"] = "sine",
) -> int:
    """Number k of weights pruned (and regrown) per task at outer update t of ``total``.

    * ``"sine"`` (official, ``main.py``'s ``cosine_annealing``): a bell 0 → η_max at t = T/2 → 0, computed as the
      official expression ``int(η_max + 0.5·(η_min − η_max)·(1 + cos(2π·t/T)))``. In exact arithmetic this is
      ``η_min + (η_max − η_min)·sin²(π·t/T)``, but ``int()`` truncates and the two float forms differ, e.g. at
      t/T = 1/4 the official form gives 50 while ``100·sin²(π/4)`` = 49.999… gives 49; we keep the official one.
      (The official code passes ``t = iteration index`` (0-based) with ``total = max_iters``.)
    * ``"cosine"``: monotone decay ``int(η_min + 0.5·(η_max − η_min)·(1 + cos(π·t/T)))`` (``fl_utils.py``'s
      unused ``cosine_annealing``), η_max at t = 0 → η_min at t = T.
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
