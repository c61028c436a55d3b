"""A linear layer seen through one binary mask per task: ``y = x (W ⊙ M_t)ᵀ + b`` for the samples of task ``t``.

The model sorts a batch by task once (:class:`TaskBatch`), so a masked layer sees contiguous task groups
(:class:`TaskGroups`). The readable path, :meth:`MaskedLinear.forward`, builds each task's masked weight
(:class:`MaskedWeights`, which also routes per-task gradients to the trainer's sink) and runs one ``F.linear`` per
group. The two fast paths that measurably change what a user waits for live in :mod:`.masked_linear_fast` and are
tested equal to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .masked_linear_fast import MaskedWeightCache, batched_group_linear, compute_dtype, use_batched_groups
from .masks import pack_masks, unpack_masks


class TaskGroups:
    """Contiguous runs of one task in a batch already sorted by task id: ``tasks[g]`` has ``sizes[g]`` samples."""

    def __init__(self, tasks: Sequence[int], sizes: Sequence[int]) -> None:
        self.tasks = [int(t) for t in tasks]
        self.sizes = [int(s) for s in sizes]
        self._index: dict[torch.device, torch.Tensor] = {}

    def task_index(self, device: torch.device) -> torch.Tensor:
        """The group tasks as an int64 tensor on ``device``, made once per forward (not once per layer)."""
        if device not in self._index:
            self._index[device] = torch.tensor(self.tasks, device=device)
        return self._index[device]

    @classmethod
    def from_sorted_ids(cls, task_ids: Sequence[int]) -> TaskGroups:
        """The groups of a sorted list of task ids."""
        tasks: list[int] = []
        sizes: list[int] = []
        for task in task_ids:
            if tasks and tasks[-1] == task:
                sizes[-1] += 1
            else:
                tasks.append(task)
                sizes.append(1)
        return cls(tasks, sizes)


class TaskBatch:
    """How a batch runs through the masked body: sorted by task (``order``, ``None`` when it already is) into the
    contiguous task groups every masked layer computes (``groups``, ``None`` without masks)."""

    def __init__(self, task_ids: list[int] | None, device: torch.device) -> None:
        self.order = self.inverse = self.groups = None
        if task_ids is None:
            return
        order = sorted(range(len(task_ids)), key=task_ids.__getitem__)  # stable, as torch.argsort(stable=True)
        if order != list(range(len(order))):
            self.order = torch.tensor(order, device=device)
            self.inverse = torch.empty_like(self.order)
            self.inverse[self.order] = torch.arange(len(order), device=device)
        self.groups = TaskGroups.from_sorted_ids([task_ids[i] for i in order])

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.order is None else x[self.order]

    def unsort(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.inverse is None else x[self.inverse]

    def sort_prompt(self, encoded):
        """A :class:`~.inputs.PromptKeyValues` in the sorted order."""
        return encoded if self.order is None else encoded.select(self.order)

    def record(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` in the caller's order, and ``x`` again computed from that copy, so gradients reach what is returned."""
        caller = self.unsort(x)
        return caller, self.sort(caller)


class MaskedWeights(torch.autograd.Function):
    """``(G, out, in)``: ``W ⊙ M[t_g]`` for the task ``t_g = task_index[g]`` of every group ``g``.

    Backward: ``grad_W = Σ_g grad_g ⊙ M[t_g]`` (zero where no task of the batch keeps a weight). With a
    ``task_grad_sink`` (a ``(num_tasks, out, in)`` tensor), each task's row of the sink is *set* to the gradient with
    respect to its effective weight ``W ⊙ M[t]`` (dense; summed over its groups when ``tasks_distinct`` is false),
    the rows of other tasks are left as they are, and ``W`` gets no gradient: the per-task signal of the trainer's
    mask update.
    """

    @staticmethod
    def forward(ctx, weight, masks, task_index, task_grad_sink=None, tasks_distinct=True):  # noqa: D102
        group_masks = masks.index_select(0, task_index)
        ctx.save_for_backward(group_masks, task_index)
        ctx.task_grad_sink, ctx.tasks_distinct = task_grad_sink, tasks_distinct
        return group_masks.to(weight.dtype).mul_(weight)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        group_masks, task_index = ctx.saved_tensors
        sink = ctx.task_grad_sink
        if sink is None:
            return (grad * group_masks.to(grad.dtype)).sum(dim=0), None, None, None, None
        if ctx.tasks_distinct:
            sink.index_copy_(0, task_index, grad.to(sink.dtype))
        else:  # a task in several groups: its row is the sum of their gradients
            sink.index_fill_(0, task_index, 0).index_add_(0, task_index, grad.to(sink.dtype))
        return None, None, None, None, None


def group_linear(
    x: torch.Tensor, weights: Sequence[torch.Tensor], bias: torch.Tensor | None, sizes: Sequence[int]
) -> torch.Tensor:
    """``F.linear(x[g], weights[g], bias)`` for contiguous groups of ``sizes`` samples (dim 0) of ``x``."""
    return torch.cat([F.linear(rows, w, bias) for rows, w in zip(x.split(sizes), weights, strict=True)])


class MaskedLinear(nn.Module):
    """``nn.Linear`` whose weight each task sees through its own binary mask.

    The masks are stored bit-packed in the persistent ``uint8`` buffer ``packed_masks`` of shape
    ``(num_tasks, ceil(out * in / 8))`` (that is what ``model.safetensors`` holds) and unpacked lazily into a cached
    ``bool`` tensor of shape ``(num_tasks, out, in)``; the cache is refreshed whenever the buffer is replaced or
    modified in place. Attributes the trainer and the policy set:

    * ``task_grad_sink``: see :class:`MaskedWeights` (the mask update's per-task gradients);
    * ``cache_masked_weights``: no-grad forwards keep each task's masked weight between calls
      (:class:`~.masked_linear_fast.MaskedWeightCache`; acting);
    * ``group_matmul``: ``"auto"`` (one batched matmul over equal-sized task groups off the CPU, where a Python loop
      over groups is launch-bound), ``"loop"`` (always one matmul per group) or ``"batched"`` (also on the CPU).
    """

    group_matmul: str = "auto"

    def __init__(self, in_features: int, out_features: int, num_tasks: int, masked: bool, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.num_tasks = num_tasks
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        if masked:
            packed_bytes = (out_features * in_features + 7) // 8
            self.register_buffer("packed_masks", torch.zeros(num_tasks, packed_bytes, dtype=torch.uint8))
        else:
            self.packed_masks = None
        self._mask_cache: tuple[tuple, torch.Tensor] | None = None
        self.task_grad_sink: torch.Tensor | None = None
        self.cache_masked_weights = False
        self.weight_cache = MaskedWeightCache()

    @property
    def is_masked(self) -> bool:
        return self.packed_masks is not None

    def task_masks(self) -> torch.Tensor:
        """All task masks as ``bool`` of shape ``(num_tasks, out, in)`` (unpacked once, then cached)."""
        if self.packed_masks is None:
            raise RuntimeError("This layer has no masks (mask_mode='none').")
        buffer = self.packed_masks
        key = (id(buffer), buffer._version, buffer.device, buffer.data_ptr())
        if self._mask_cache is None or self._mask_cache[0] != key:
            shape = (self.num_tasks, self.out_features, self.in_features)
            self._mask_cache = (key, unpack_masks(buffer, shape))
        return self._mask_cache[1]

    @torch.no_grad()
    def set_task_masks(self, masks: torch.Tensor, copy: bool = True) -> None:
        """Replace the masks (``bool``, ``(num_tasks, out, in)``); packs them into the persistent buffer.

        The layer keeps the unpacked masks too; ``copy=False`` lets it keep ``masks`` itself when it is already a
        contiguous ``bool`` tensor on the layer's device (the caller then must not modify it)."""
        expected = (self.num_tasks, self.out_features, self.in_features)
        if tuple(masks.shape) != expected:
            raise ValueError(f"masks must have shape {expected}, got {tuple(masks.shape)}")
        given = masks
        masks = masks.to(device=self.packed_masks.device, dtype=torch.bool).contiguous()
        if copy and masks.data_ptr() == given.data_ptr():
            masks = masks.clone()
        buffer = self.packed_masks
        buffer.copy_(pack_masks(masks))
        # The unpacked cache is these masks: no need to unpack the new buffer again (keyed like task_masks()).
        self._mask_cache = ((id(buffer), buffer._version, buffer.device, buffer.data_ptr()), masks)

    def drop_weight_cache(self) -> None:
        """Forget the inference cache of masked weights (see ``cache_masked_weights``)."""
        self.weight_cache.clear()

    def forward(self, x: torch.Tensor, groups: TaskGroups | None = None) -> torch.Tensor:
        """``x (W ⊙ M_t)ᵀ + b`` for every group of ``x``'s samples (dim 0); a plain linear without masks or groups."""
        if self.packed_masks is None or groups is None:
            return F.linear(x, self.weight, self.bias)
        if self.cache_masked_weights and not torch.is_grad_enabled():  # acting: the masked weights of earlier calls
            dtype = compute_dtype(x)
            weights, bias = self.weight_cache.lookup(self.weight, self.bias, self.task_masks(), groups.tasks, dtype)
            return group_linear(x.to(dtype), weights, bias, groups.sizes)
        self.drop_weight_cache()
        masks, index, sink = self.task_masks(), groups.task_index(x.device), self.task_grad_sink
        if use_batched_groups(self.group_matmul, x, groups.sizes):
            distinct = len(set(groups.tasks)) == len(groups.tasks)
            return batched_group_linear(x, MaskedWeights.apply(self.weight, masks, index, sink, distinct), self.bias)
        weights: dict[int, torch.Tensor] = {}  # one masked weight per task, also when a task has several groups
        for g, task in enumerate(groups.tasks):
            if task not in weights:
                weights[task] = MaskedWeights.apply(self.weight, masks, index[g : g + 1], sink)[0]
        return group_linear(x, [weights[task] for task in groups.tasks], self.bias, groups.sizes)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, masked={self.is_masked}"
