"""Rule ``"reference"``: the official HarmoDT code's mask update, its float32 numerics and its flaws kept on purpose.

It mirrors ``main.py`` and ``prompt_dt/fl_utils.py`` of charleshsc/HarmoDT (``update_gradient``,
``get_harmo_gradient``, ``mask_dead_harmo`` = regrow, ``mask_generate_harmo`` = prune), so that runs of the intended
algorithm (:mod:`.harmony`) can be compared with what the official numbers came from. ``HarmoDTTrainer`` reaches it
from one branch point (``update_rule="reference"``) through :class:`ReferenceRule`, which also holds the masks the
official code keeps over the parameters our forward pass never masks, and saves them in checkpoints.

Known flaws kept (REFERENCE.md, "Known flaws of the official numerics"):

1. Regrow is tie-breaking: the masked ``g_i`` is 0 at inactive body weights, so their regrow score is exactly
   ``0 + 1 = 1.0`` in float32 (as is any ``ḡ⊙g_i`` below ~6e-8); which tied entries ``torch.topk`` returns depends on
   the implementation (CPU and CUDA may differ). ``stats["regrow_ties"]`` counts the entries tied with the k-th.
2. Prune and regrow also land on embedding/head parameters, which the forward pass does not mask.
3. The in-place mean: task 0's gradient buffer *becomes* ḡ, so task 0 is scored with ``g_0 := ḡ``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from harmodt_hf.model.modeling_harmodt import HarmoDTModel

REFERENCE_MASKS_FILE = "reference_extra_masks.safetensors"
OFFSET = 100000  # the official scores' offset between active and inactive weights


def official_mean_gradient(flat_grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """ḡ as ``get_harmo_gradient`` computes it on CUDA: a sequential float32 sum in task order into the first
    buffer, then ``/= T``, which CUDA evaluates for a Python-scalar divisor as ``x * float32(1/T)``."""
    total: torch.Tensor | None = None
    count = 0
    for g in flat_grads:
        total = g.to(torch.float32).clone() if total is None else total.add_(g.to(torch.float32))
        count += 1
    if total is None:
        raise ValueError("no task gradients")
    inverse = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(count), dtype=torch.float32)
    return total.mul_(inverse.to(total.device))


def reference_prune_regrow(
    masks_all: Mapping[str, torch.Tensor],
    task_grads_all: Mapping[str, torch.Tensor],
    params_all: Mapping[str, torch.Tensor] | None,
    k: int,
    gamma: float,
    kind: Literal["fisher", "magnitude"],
) -> tuple[dict[str, torch.Tensor], dict]:
    """The official prune/regrow over one float32 vector per task holding *every* parameter (dict order = the
    model's ``named_parameters`` order, embeddings and heads included). Per task i:

    * regrow the k largest ``ḡ⊙g_i + (1 − M_i·1e5)``;
    * prune the k smallest ``((1 − M_i)·1e5 + (ḡ⊙g_i)·γ) + imp``, ``imp = g_i²`` (fisher) or ``|θ|`` (magnitude),
      each step rounded to float32 as in the official code; ``M_new = M − pruned + regrown``.

    Args:
        masks_all: name -> bool ``(T, *shape)`` for every parameter of the model.
        task_grads_all: name -> ``(T, *shape)`` per-task gradients as the official code computes them
            (:meth:`ReferenceRule.task_gradients`); cast to float32.
        params_all: name -> current parameter; needed for ``kind="magnitude"``.
        k: weights pruned and regrown per task (``ValueError`` beyond a task's active or inactive count).
        gamma: weight of the agreement term in the prune score (official default 10).
        kind: ``"fisher"`` or ``"magnitude"``.

    Returns:
        ``(new_masks, stats)`` as :func:`harmony.select_prune_regrow`, plus ``stats["regrow_ties"]`` (``(T,)``).
        ``RuntimeError`` if the official scores would prune an inactive or regrow an active weight (the official
        update would then leave masks outside {0, 1}).
    """
    if kind not in ("fisher", "magnitude"):
        raise ValueError(f'importance kind must be "fisher" or "magnitude", got {kind!r}')
    names = list(masks_all)
    for name in names:
        if name not in task_grads_all or task_grads_all[name].shape != masks_all[name].shape:
            raise ValueError(f"task_grads_all[{name!r}] is missing or not shaped as its mask")
    num_tasks = masks_all[names[0]].shape[0]
    masks = torch.stack([_row(masks_all, names, task) for task in range(num_tasks)])
    active = masks.sum(dim=1)
    if not isinstance(k, int) or k < 0 or k > int(active.min()) or k > int((masks.shape[1] - active).min()):
        raise ValueError(
            f"k={k} must be a non-negative int within a task's active and inactive counts: active counts "
            f"{active.tolist()}, inactive counts {(masks.shape[1] - active).tolist()}"
        )
    theta_abs = None
    if kind == "magnitude":
        if params_all is None or any(n not in params_all for n in names):
            raise ValueError('importance kind "magnitude" needs params_all for every parameter')
        theta_abs = torch.cat([params_all[n].detach().reshape(-1) for n in names]).to(torch.float32).abs()

    gbar = official_mean_gradient(_row(task_grads_all, names, task) for task in range(num_tasks))
    prune_idx, regrow_idx, ties = [], [], []
    for task in range(num_tasks):
        g = gbar if task == 0 else _row(task_grads_all, names, task).to(torch.float32)  # flaw 3
        m = masks[task].to(torch.float32)
        agreement = gbar * g
        regrow = (1 - m * OFFSET) + agreement
        prune = ((1 - m) * OFFSET + agreement * gamma) + (g * g if theta_abs is None else theta_abs)
        top = torch.topk(regrow, k, largest=True) if k else None
        regrow_idx.append(top.indices if k else torch.empty(0, dtype=torch.int64))
        ties.append(int(torch.count_nonzero(regrow == top.values[-1])) if k else 0)
        prune_idx.append(torch.topk(prune, k, largest=False).indices)
    prune_idx, regrow_idx = torch.stack(prune_idx), torch.stack(regrow_idx)
    if not masks.gather(1, prune_idx).all() or masks.gather(1, regrow_idx).any():
        raise RuntimeError(
            "official scores selected an inactive weight to prune or an active weight to regrow (scores beyond the "
            "1e5 offset); the official update would leave masks outside {0, 1}"
        )
    rows = torch.arange(num_tasks).unsqueeze(1)
    new = masks.clone()
    new[rows, prune_idx] = False
    new[rows, regrow_idx] = True
    sizes = [masks_all[n][0].numel() for n in names]
    new_masks = {n: part.reshape(masks_all[n].shape) for n, part in zip(names, new.split(sizes, dim=1), strict=True)}
    counts = torch.full((num_tasks,), k, dtype=torch.int64)
    stats = {
        "pruned": counts,
        "regrown": counts.clone(),
        "active": new.sum(dim=1),
        "prune_indices": prune_idx.sort(dim=1).values,
        "regrow_indices": regrow_idx.sort(dim=1).values,
        "regrow_ties": torch.tensor(ties, dtype=torch.int64),
    }
    return new_masks, stats


class ReferenceRule:
    """The reference rule for one model: official task gradients, the selection over every parameter, and the
    masks of the parameters our forward pass never masks (embeddings, heads, biases, norms; dense at the start),
    which the official code keeps and lets compete in the selection."""

    def __init__(self, model: HarmoDTModel) -> None:
        self.model = model
        self.extra_masks: dict[str, torch.Tensor] | None = None

    def masks_all(self) -> dict[str, torch.Tensor]:
        """Masks over every parameter, in ``named_parameters`` order: the model's body masks and the extra ones."""
        body = self.model.get_task_masks()
        if self.extra_masks is None:
            num_tasks = self.model.config.num_tasks
            self.extra_masks = {
                name: torch.ones(num_tasks, *p.shape, dtype=torch.bool, device=p.device)
                for name, p in self.model.named_parameters()
                if name not in body
            }
        return {name: body.get(name, self.extra_masks.get(name)) for name, _ in self.model.named_parameters()}

    def task_gradients(
        self, task_loss: Callable[[int], torch.Tensor], max_grad_norm: float
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The official per-task gradients (``update_gradient``): one pass per task; the dense gradient (with respect
        to the effective weights ``θ ⊙ M_t``, as the official code loads them into the model) is clipped to
        ``max_grad_norm`` over all parameters, then multiplied by the task's masks except for ``embed``/``predict``
        parameters. Returns ``name -> (T, *shape)`` for every parameter and the ``(T,)`` task losses."""
        model = self.model
        num_tasks = model.config.num_tasks
        params = dict(model.named_parameters())
        layers = model.masked_layers()
        sinks = {f"{name}.weight": layer for name, layer in layers.items()}
        masks_all = self.masks_all()
        grads = {name: torch.zeros(num_tasks, *p.shape, device=p.device) for name, p in params.items()}
        losses = torch.zeros(num_tasks)
        for layer in sinks.values():  # receives each task's dense effective-weight gradient in its row
            layer.task_grad_sink = torch.zeros(num_tasks, *layer.weight.shape, device=layer.weight.device)
        try:
            for task in range(num_tasks):
                loss = task_loss(task)
                task_grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                dense = {
                    name: sinks[name].task_grad_sink[task] if name in sinks else g
                    for name, g in zip(params, task_grads, strict=True)
                }
                norm = torch.sqrt(sum(g.pow(2).sum() for g in dense.values() if g is not None))
                scale = min(1.0, max_grad_norm / (float(norm) + 1e-6)) if max_grad_norm > 0 else 1.0
                for name, g in dense.items():
                    if g is not None:
                        unmasked = "embed" in name or "predict" in name
                        grads[name][task] = g * scale if unmasked else g * scale * masks_all[name][task]
                losses[task] = loss.item()
        finally:
            for layer in layers.values():
                layer.task_grad_sink = None
        return grads, losses

    def update(self, task_grads_all: Mapping[str, torch.Tensor], k: int, gamma: float, kind: str) -> tuple[dict, dict]:
        """Select over every parameter; keep the new extra masks and return the new body masks and the stats."""
        params = dict(self.model.named_parameters())
        new_all, stats = reference_prune_regrow(self.masks_all(), task_grads_all, params, k, gamma, kind)
        body = self.model.get_task_masks()
        self.extra_masks = {name: m for name, m in new_all.items() if name not in body}
        return {name: new_all[name] for name in body}, stats

    def save(self, folder: str | os.PathLike) -> None:
        """Write the extra masks into a checkpoint folder (nothing before the first update)."""
        if self.extra_masks is not None:
            extra = {k: v.to(torch.uint8).contiguous().cpu() for k, v in self.extra_masks.items()}
            save_file(extra, os.path.join(folder, REFERENCE_MASKS_FILE))

    def load(self, folder: str | os.PathLike, expected: bool) -> None:
        """Read the extra masks of a checkpoint folder; ``expected`` (a mask update ran before it was saved) makes
        their absence an error rather than a silent restart from dense extra masks."""
        path = os.path.join(folder, REFERENCE_MASKS_FILE)
        if os.path.exists(path):
            self.extra_masks = {k: v.bool() for k, v in load_file(path).items()}
        elif expected:
            raise ValueError(
                f"Cannot resume from {folder}: it lacks {REFERENCE_MASKS_FILE}, the reference rule's masks over the "
                "parameters the forward pass does not mask; resuming would reset them to dense. Resume from a "
                "checkpoint that holds it."
            )


def _row(tensors: Mapping[str, torch.Tensor], names: list[str], task: int) -> torch.Tensor:
    """Task ``task``'s entries of every tensor, flattened and concatenated in ``names`` order."""
    return torch.cat([tensors[name][task].reshape(-1) for name in names])
