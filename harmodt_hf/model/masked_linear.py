"""A linear layer seen through one binary mask per task, computed group by group (one masked weight per task)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .masks import pack_masks, unpack_masks


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight ⊙ mask`` for a ``bool`` mask, as a new tensor.

    The mask is read as bytes and converted to the weight's dtype first: on CPU that is several times faster than
    multiplying by (or ``torch.where`` on) a ``bool`` tensor, which PyTorch does element by element.
    """
    factor = mask.view(torch.uint8).to(weight.dtype)
    if weight.requires_grad and torch.is_grad_enabled():
        return weight * factor
    return factor.mul_(weight)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would compute in here: the autocast dtype when autocast is on, else the input's."""
    device = x.device.type
    if x.is_floating_point() and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


# How the task groups are multiplied: "loop" (one matmul per group; the CPU default, lowest memory), "batched" (one
# batched matmul over all groups when they have equal sizes; the default on accelerators, where a Python loop over 50
# groups is launch-bound) or "auto" (batched off the CPU; on every device for inference on cached weights). Inference
# on cached weights off the CPU ("auto") or with "batched" also pads unequal groups into one batched matmul.
GROUP_MATMUL_MODES = ("auto", "loop", "batched")


def _use_batched_groups(mode: str, x: torch.Tensor, group_sizes: Sequence[int], auto_on_cpu: bool = False) -> bool:
    """Whether equal groups go through one batched matmul; ``auto_on_cpu``: "auto" batches on the CPU too (inference
    on cached weights, whose stacks are built once; in training the per-group loop is as fast there)."""
    if mode not in GROUP_MATMUL_MODES:
        raise ValueError(f"group_matmul must be one of {GROUP_MATMUL_MODES}, got {mode!r}")
    if len(group_sizes) < 2 or len(set(group_sizes)) != 1:
        return False
    return mode == "batched" or (mode == "auto" and (auto_on_cpu or x.device.type != "cpu"))


def _pad_groups_for_inference(mode: str, x: torch.Tensor, group_sizes: Sequence[int]) -> bool:
    """Whether cached inference pads unequal groups to one batched matmul: off the CPU (where a loop over groups is
    launch-bound and extra rows cost little), or everywhere with ``"batched"``."""
    if len(group_sizes) < 2 or len(set(group_sizes)) == 1:
        return False
    return mode == "batched" or (mode == "auto" and x.device.type != "cpu")


def _masked_group_weights(weight: torch.Tensor, masks: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
    """``(G, out, in)``: ``W ⊙ M[t_g]`` for every group, in three kernels whatever the number of groups."""
    return masks.index_select(0, task_index).view(torch.uint8).to(weight.dtype).mul_(weight)


def _group_row_blocks(
    x: torch.Tensor, group_sizes: Sequence[int], out: int
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A new output for ``x`` with ``out`` features, and every contiguous group's (input rows, output rows) views."""
    result = x.new_empty(*x.shape[:-1], out)
    rows = [size * math.prod(x.shape[1:-1]) for size in group_sizes]  # samples x tokens per sample
    blocks = list(zip(x.reshape(-1, x.shape[-1]).split(rows), result.view(-1, out).split(rows), strict=True))
    return result, blocks


def _grouped_linear(
    x: torch.Tensor, weights: Iterable[torch.Tensor], bias: torch.Tensor | None, group_sizes: Sequence[int], out: int
) -> torch.Tensor:
    """``x[g] @ weights[g]ᵀ + bias`` for contiguous groups of ``group_sizes`` samples, each written into one output."""
    result, blocks = _group_row_blocks(x, group_sizes, out)
    for (rows_in, rows_out), weight in zip(blocks, weights, strict=True):
        if bias is not None:
            torch.addmm(bias, rows_in, weight.T, out=rows_out)
        else:
            torch.mm(rows_in, weight.T, out=rows_out)
    return result


def _bias_gradient(ctx, grad_rows: torch.Tensor) -> torch.Tensor | None:
    """Sum of the output-gradient rows, or ``None`` when the bias needs no gradient.

    A vector-matrix product sums the rows several times faster on CPU than ``sum(0)`` (and, like autocast's own
    bias gradient in reduced precision, accumulates in float32 and rounds to the compute dtype)."""
    if not (ctx.has_bias and ctx.needs_input_grad[2]):
        return None
    return (grad_rows.new_ones(grad_rows.shape[0]) @ grad_rows).to(ctx.weight_dtype)


class _GroupedMaskedLinear(torch.autograd.Function):
    """``y[g] = x[g] @ (W ⊙ M[t_g])ᵀ + b`` for contiguous task groups ``g``.

    Autocast-aware by hand: under autocast the input and the weight are cast once to the autocast dtype, the masked
    weights are built in it, and every group writes into one preallocated output (no per-group casts, no ``cat``).
    With several groups the masked weight of a group is rebuilt in backward instead of being kept alive from
    forward, so memory holds one masked copy at a time whatever the number of tasks; a one-group batch (round robin)
    keeps its single masked weight. ``grad_W = Σ_g (grad_y[g]ᵀ x[g]) ⊙ M[t_g]``: it is exactly zero where every task
    of the batch has its mask off. With a ``task_grad_sink`` (``(num_tasks, out, in)``), the backward pass instead
    sets ``sink[t]`` to the sum of task t's *unmasked* ``grad_y[g]ᵀ x[g]`` (the gradient with respect to the
    effective weight ``W ⊙ M[t]``) for every task t in the batch — the per-task signal the mask update scores —
    leaves the rows of other tasks as they are, and returns no weight gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, masks, groups, task_grad_sink=None, mode="auto"):  # noqa: D102
        group_tasks, group_sizes = groups.tasks, groups.sizes
        dtype = _compute_dtype(x)
        x_c = x.to(dtype)
        weight_c = weight.to(dtype)
        bias_c = bias.to(dtype) if bias is not None else None
        ctx.batched = _use_batched_groups(mode, x, group_sizes)
        ctx.input_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        ctx.has_bias = bias is not None
        ctx.task_grad_sink = task_grad_sink
        ctx.tasks_distinct = len(set(group_tasks)) == len(group_tasks)  # each task one group: its sink row is set
        if ctx.batched:  # equal groups: one batched matmul, all masked weights kept for backward
            task_index = groups.task_index(x.device)
            w_groups = _masked_group_weights(weight_c, masks, task_index)
            x3 = x_c.reshape(len(group_tasks), -1, x.shape[-1])
            out = x_c.new_empty(*x.shape[:-1], weight.shape[0])  # returned as a base tensor, not a view
            torch.bmm(x3, w_groups.transpose(1, 2), out=out.view(len(group_tasks), -1, weight.shape[0]))
            if bias_c is not None:
                out.add_(bias_c)
            ctx.save_for_backward(x_c, weight_c, masks, task_index, w_groups)
            return out
        # Mask-gradient passes (a sink, no optimizer step) and one-group batches keep the masked weights for backward;
        # training on several groups builds one masked weight at a time and rebuilds it in backward.
        keep = task_grad_sink is not None or len(group_tasks) == 1
        masked = [apply_mask(weight_c, masks[task]) for task in group_tasks] if keep else None
        weights = masked if masked is not None else (apply_mask(weight_c, masks[task]) for task in group_tasks)
        out = _grouped_linear(x_c, weights, bias_c, group_sizes, weight.shape[0])
        per_row = math.prod(x.shape[1:-1])  # rows per sample (tokens)
        ctx.save_for_backward(x_c, weight_c, masks)
        ctx.group_tasks = group_tasks
        ctx.rows = [size * per_row for size in group_sizes]
        ctx.masked_weights = masked
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        if ctx.batched:
            return _GroupedMaskedLinear._batched_backward(ctx, grad_out)
        x_c, weight_c, masks = ctx.saved_tensors
        grad_x = grad_weight = None
        grad_rows = grad_out.to(x_c.dtype).reshape(-1, grad_out.shape[-1])
        x_rows = x_c.reshape(-1, x_c.shape[-1])
        grad_groups, x_groups = grad_rows.split(ctx.rows), x_rows.split(ctx.rows)
        sink, kept = ctx.task_grad_sink, ctx.masked_weights
        if ctx.needs_input_grad[0]:
            masked = kept if kept is not None else (apply_mask(weight_c, masks[t]) for t in ctx.group_tasks)
            grad_in = x_rows.new_empty(x_rows.shape)
            for g, w, out in zip(grad_groups, masked, grad_in.split(ctx.rows), strict=True):
                torch.mm(g, w, out=out)
            grad_x = grad_in.view(x_c.shape).to(ctx.input_dtype)
        if sink is not None:
            # Per-task gradients w.r.t. the effective weights only; the shared weight's gradient is not needed here.
            # A task's first group writes its row directly (no zeroed sink, no temporary); further groups add to it.
            written: set[int] = set()
            for g, x_group, t in zip(grad_groups, x_groups, ctx.group_tasks, strict=True):
                if t in written:
                    sink[t] += g.T @ x_group
                elif sink.dtype == g.dtype:
                    torch.mm(g.T, x_group, out=sink[t])
                else:
                    sink[t].copy_(g.T @ x_group)
                written.add(t)
        elif ctx.needs_input_grad[1]:
            for g, x_group, t in zip(grad_groups, x_groups, ctx.group_tasks, strict=True):
                term = (g.T @ x_group).to(ctx.weight_dtype).mul_(masks[t].view(torch.uint8).to(ctx.weight_dtype))
                grad_weight = term if grad_weight is None else grad_weight.add_(term)
        grad_bias = _bias_gradient(ctx, grad_rows)
        return grad_x, grad_weight, grad_bias, None, None, None, None

    @staticmethod
    def _batched_backward(ctx, grad_out):
        x_c, weight_c, masks, task_index, w_groups = ctx.saved_tensors
        grad_x = grad_weight = None
        groups = w_groups.shape[0]
        g3 = grad_out.to(x_c.dtype).reshape(groups, -1, grad_out.shape[-1])
        x3 = x_c.reshape(groups, -1, x_c.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(g3, w_groups).view(x_c.shape).to(ctx.input_dtype)
        sink = ctx.task_grad_sink
        if sink is not None or ctx.needs_input_grad[1]:
            per_group = torch.bmm(g3.transpose(1, 2), x3)  # (G, out, in): each group's effective-weight gradient
            if sink is not None:
                if ctx.tasks_distinct:
                    sink.index_copy_(0, task_index, per_group.to(sink.dtype))
                else:
                    sink.index_fill_(0, task_index, 0).index_add_(0, task_index, per_group.to(sink.dtype))
            else:
                factor = masks.index_select(0, task_index).view(torch.uint8).to(ctx.weight_dtype)
                grad_weight = factor.mul_(per_group.to(ctx.weight_dtype)).sum(dim=0)
        grad_bias = _bias_gradient(ctx, g3.reshape(-1, g3.shape[-1]))
        return grad_x, grad_weight, grad_bias, None, None, None, None


class TaskGroups:
    """Contiguous runs of one task in a batch already sorted by task id."""

    def __init__(self, tasks: Sequence[int], sizes: Sequence[int]) -> None:
        self.tasks = [int(t) for t in tasks]
        self.sizes = [int(s) for s in sizes]
        self._index: dict[torch.device, torch.Tensor] = {}
        self._padding: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def task_index(self, device: torch.device) -> torch.Tensor:
        """The group tasks as an int64 tensor on ``device``, made once per forward (not once per layer)."""
        if device not in self._index:
            self._index[device] = torch.tensor(self.tasks, device=device)
        return self._index[device]

    def padding(self, device: torch.device, rows_per_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices that lay the batch out as equal groups and back: ``gather`` picks, for every group, its rows
        then copies of its last sample's rows up to the largest group's size; ``scatter`` picks each real row's
        place in that layout. Made once per forward and row count."""
        key = (device, rows_per_sample)
        if key not in self._padding:
            largest, r = max(self.sizes), rows_per_sample
            starts = torch.tensor([0, *self.sizes[:-1]]).cumsum(0)
            sizes = torch.tensor(self.sizes)
            slot = torch.arange(largest)
            samples = starts[:, None] + torch.minimum(slot[None], sizes[:, None] - 1)  # (G, largest)
            gather = (samples[..., None] * r + torch.arange(r)).reshape(-1)
            real = slot[None] < sizes[:, None]  # (G, largest): which padded slots hold real samples, in batch order
            places = torch.arange(len(self.sizes) * largest).view(-1, largest)[real]
            scatter = (places[:, None] * r + torch.arange(r)).reshape(-1)
            self._padding[key] = (gather.to(device), scatter.to(device))
        return self._padding[key]

    @classmethod
    def from_sorted_ids(cls, task_ids: torch.Tensor) -> TaskGroups:
        tasks, counts = torch.unique_consecutive(task_ids, return_counts=True)
        return cls(tasks.tolist(), counts.tolist())


class MaskedLinear(nn.Module):
    """``nn.Linear`` whose weight each task sees through its own binary mask.

    The masks are stored bit-packed in the persistent ``uint8`` buffer ``packed_masks`` of shape
    ``(num_tasks, ceil(out * in / 8))`` (that is what ``model.safetensors`` holds) and unpacked lazily into a cached
    ``bool`` tensor of shape ``(num_tasks, out, in)``; the cache is refreshed whenever the buffer is replaced or
    modified in place.
    """

    # "recompute": custom autograd that rebuilds W ⊙ M in backward (kept: fastest in benchmarks/bench_model.py);
    # "autograd": plain F.linear per group through autograd (kept for the benchmark's comparison).
    implementation: str = "recompute"
    # See GROUP_MATMUL_MODES.
    group_matmul: str = "auto"
    # Inference: how many stacks of per-group masked weights (one per tuple of tasks) a layer keeps.
    GROUP_STACKS_KEPT: int = 2

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
        # Set by the trainer's mask update: (num_tasks, out, in) tensor receiving per-task effective-weight grads
        # (the rows of the tasks in the batch are overwritten by the backward pass; see _GroupedMaskedLinear).
        self.task_grad_sink: torch.Tensor | None = None
        # Inference only (see HarmoDTModel.cache_masked_weights), in the compute dtype, valid for ``_weight_key``:
        # task -> (W ⊙ M[task])ᵀ, ("groups", tasks) -> those stacked, and the bias.
        self.cache_masked_weights = False
        self._weight_cache: dict[int | tuple, torch.Tensor] = {}
        self._bias_cache: torch.Tensor | None = None
        self._weight_key: tuple | None = None

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
        self._weight_cache, self._bias_cache, self._weight_key = {}, None, None

    def _valid_weight_cache(self, dtype: torch.dtype) -> dict[int | tuple, torch.Tensor]:
        """The inference cache of masked weights in the compute ``dtype``, emptied first if the weight, the bias, the
        masks or the dtype changed since it was filled (checked once per call, not once per task group)."""
        bias = self.bias
        key = (
            self.weight._version,
            self.weight.data_ptr(),
            self.weight.dtype,
            id(self.task_masks()),
            None if bias is None else (bias._version, bias.data_ptr()),
            dtype,
        )
        if key != self._weight_key:
            self._weight_cache, self._weight_key = {}, key
            self._bias_cache = bias.detach().to(dtype) if bias is not None else None  # a tensor, not a Parameter
        return self._weight_cache

    def _task_weight_t(self, cache: dict, task: int, dtype: torch.dtype) -> torch.Tensor:
        """``(W ⊙ M[task])ᵀ`` as a contiguous ``(in, out)`` tensor in ``dtype``, kept in ``cache`` (the validated
        :meth:`_valid_weight_cache`) between inference calls."""
        if task not in cache:
            cache[task] = apply_mask(self.weight.detach().to(dtype), self.task_masks()[task]).T.contiguous()
        return cache[task]

    def _group_weights_t(self, cache: dict, tasks: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """``(G, in, out)``: the transposed masked weights of ``tasks`` stacked for one batched matmul, kept in
        ``cache`` for the last :attr:`GROUP_STACKS_KEPT` task tuples (a pipelined evaluation alternates two)."""
        key = ("groups", tasks)
        if key not in cache:
            stacks = [k for k in cache if isinstance(k, tuple)]
            for old in stacks[: max(0, len(stacks) - self.GROUP_STACKS_KEPT + 1)]:
                del cache[old]
            index = torch.tensor(tasks, device=self.weight.device)
            cache[key] = _masked_group_weights(self.weight.detach().to(dtype), self.task_masks(), index).mT.contiguous()
        return cache[key]

    def _cached_forward(self, x: torch.Tensor, groups: TaskGroups) -> torch.Tensor:
        """No-grad forward on cached masked weights: one batched matmul over task groups of equal size; unequal
        groups go through one padded batched matmul off the CPU (see ``_pad_groups_for_inference``) and through one
        single-matrix batched matmul per group on it. On the CPU every group's rows go through the same kernel
        either way, so a sample's output does not depend on the other groups in the batch."""
        dtype = _compute_dtype(x)
        x_c = x.to(dtype)
        cache = self._valid_weight_cache(dtype)  # first: it also renews the cached bias
        bias, sizes, out = self._bias_cache, groups.sizes, self.out_features
        padded = _pad_groups_for_inference(self.group_matmul, x, sizes)
        if padded or _use_batched_groups(self.group_matmul, x, sizes, True):
            if padded:  # unequal groups: laid out as equal ones (copies of a real sample), one batched matmul
                gather, scatter = groups.padding(x.device, math.prod(x.shape[1:-1]))
                x3 = x_c.reshape(-1, self.in_features).index_select(0, gather).view(len(sizes), -1, self.in_features)
            else:
                x3 = x_c.reshape(len(sizes), -1, self.in_features)
            weights = self._group_weights_t(cache, tuple(groups.tasks), dtype)
            if bias is None:
                y3 = torch.bmm(x3, weights)
            else:
                y3 = torch.baddbmm(bias.expand(*x3.shape[:2], out), x3, weights)
            if padded:
                return y3.view(-1, out).index_select(0, scatter).view(*x.shape[:-1], out)
            return y3.view(*x.shape[:-1], out)
        result, blocks = _group_row_blocks(x_c, sizes, out)
        for (rows_in, rows_out), task in zip(blocks, groups.tasks, strict=True):
            x3, out3 = rows_in.unsqueeze(0), rows_out.unsqueeze(0)
            weight = self._task_weight_t(cache, task, dtype).unsqueeze(0)
            if bias is None:
                torch.bmm(x3, weight, out=out3)
            else:
                torch.baddbmm(bias.expand_as(out3), x3, weight, out=out3)
        return result

    def forward(self, x: torch.Tensor, groups: TaskGroups | None = None) -> torch.Tensor:
        if self.packed_masks is None or groups is None:
            return F.linear(x, self.weight, self.bias)
        if self.cache_masked_weights and not torch.is_grad_enabled():
            return self._cached_forward(x, groups)
        self.drop_weight_cache()
        masks = self.task_masks()
        if self.implementation == "autograd" and self.task_grad_sink is None:
            outputs = [
                F.linear(x_group, apply_mask(self.weight, masks[t]))
                for x_group, t in zip(x.split(groups.sizes), groups.tasks, strict=True)
            ]
            out = torch.cat(outputs)
            return out + self.bias if self.bias is not None else out
        return _GroupedMaskedLinear.apply(
            x, self.weight, self.bias, masks, groups, self.task_grad_sink, self.group_matmul
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, masked={self.is_masked}"
