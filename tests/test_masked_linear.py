"""MaskedLinear alone: every forward path against the per-sample formula, and the per-task gradient sink."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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


# Every way MaskedLinear computes a batch: (group_matmul, cached inference, gradients, sink).
FORWARD_PATHS = {
    "loop": dict(mode="loop"),
    "one-group": dict(mode="loop", tasks=[1], sizes=[5]),
    "batched": dict(mode="batched", tasks=[2, 0, 1], sizes=[2, 2, 2]),
    "no-grad": dict(mode="loop", grad=False),
    "cached-equal-groups": dict(mode="auto", tasks=[2, 0, 1], sizes=[2, 2, 2], grad=False, cached=True),
    "cached-unequal-groups": dict(mode="auto", grad=False, cached=True),
    "sink-loop": dict(mode="loop", sink=True),
    "sink-batched": dict(mode="batched", tasks=[2, 0, 1], sizes=[2, 2, 2], sink=True),
}


@pytest.mark.parametrize("path", list(FORWARD_PATHS))
def test_every_path_computes_linear_with_each_samples_masked_weight_and_the_bias(path):
    """Output = F.linear(x_i, W ⊙ M[t_i], b) for every sample i, with a random non-zero bias; with gradients, the
    input, weight and bias gradients equal those of that per-sample formula too (except in the mask-gradient pass,
    which returns no weight gradient). Tolerance 1e-5: kernels round differently by row count."""
    spec = {"tasks": [0, 2, 1, 0], "sizes": [2, 1, 3, 1], "grad": True, "cached": False, "sink": False,
            **FORWARD_PATHS[path]}  # fmt: skip
    torch.manual_seed(0)
    layer = MaskedLinear(6, 5, num_tasks=3, masked=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    layer.set_task_masks(torch.rand(3, 5, 6) < 0.6)
    layer.group_matmul = spec["mode"]
    layer.cache_masked_weights = spec["cached"]
    sample_tasks = [t for t, n in zip(spec["tasks"], spec["sizes"], strict=True) for _ in range(n)]
    x = torch.randn(len(sample_tasks), 3, 6, requires_grad=spec["grad"])
    groups = TaskGroups(spec["tasks"], spec["sizes"])
    if spec["sink"]:
        layer.task_grad_sink = torch.zeros(3, 5, 6)
    with torch.set_grad_enabled(spec["grad"]):
        out = layer(x, groups)
        if spec["cached"]:
            assert layer.weight_cache.weights, "the cached path was not taken"
            out = layer(x, groups)  # and again on the filled cache
    masks = layer.task_masks()
    expected = torch.stack([F.linear(x[i], layer.weight * masks[t], layer.bias) for i, t in enumerate(sample_tasks)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if not spec["grad"]:
        return
    weights = torch.randn(out.shape)
    params = [x, layer.weight, layer.bias]
    got = torch.autograd.grad((out * weights).sum(), params, allow_unused=True)
    want = torch.autograd.grad((expected * weights).sum(), params)
    layer.task_grad_sink = None
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    if spec["sink"]:  # the weight's gradient goes to the sink; the bias's is returned (the official clipping norm)
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
