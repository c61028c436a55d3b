"""MaskedLinear alone: the per-task gradient sink of the mask update."""

from __future__ import annotations

import pytest
import torch

from harmodt_hf.model.masked_linear import MaskedLinear, TaskGroups


@pytest.mark.parametrize("mode", ["loop", "batched"])
@pytest.mark.parametrize(
    ("tasks", "task_rows"),
    [([0, 1, 0], {0: [0, 1, 4, 5], 1: [2, 3]}), ([1, 0, 2], {1: [0, 1], 0: [2, 3], 2: [4, 5]})],
    ids=["task-seen-twice", "distinct-tasks"],
)
def test_task_grad_sink_rows_are_set_to_each_tasks_gradient(mode, tasks, task_rows):
    """Each task's row of the sink is set (not added to what it held) to dL/d(W ⊙ M_t) summed over the task's groups,
    also when a task's groups are not contiguous (tasks 0, 1, 0), in the per-group loop and the batched matmul."""
    torch.manual_seed(0)
    layer = MaskedLinear(5, 3, num_tasks=3, masked=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    layer.set_task_masks(torch.rand(3, 3, 5) < 0.5)
    layer.group_matmul = mode
    x = torch.randn(6, 4, 5)
    layer.task_grad_sink = torch.full((3, 3, 5), 7.0)
    out = layer(x, TaskGroups(tasks, [2] * len(tasks)))
    torch.autograd.grad(out.square().sum(), layer.weight, allow_unused=True)
    sink, layer.task_grad_sink = layer.task_grad_sink, None
    for task, rows in task_rows.items():
        effective = (layer.weight * layer.task_masks()[task]).detach().requires_grad_()
        (grad,) = torch.autograd.grad(torch.nn.functional.linear(x[rows], effective).square().sum(), effective)
        torch.testing.assert_close(sink[task], grad, atol=1e-5, rtol=1e-5)
    for task in set(range(3)) - set(task_rows):
        assert bool((sink[task] == 7.0).all())  # a task without samples keeps its row
