"""The fast paths of :class:`~.masked_linear.MaskedLinear`, kept apart from its readable path because each one changes
what a user waits for by a measured ≥ 20 % (``benchmarks/RESULTS.md``, "Renovation: which fast paths stay"):

* :func:`batched_group_linear`: equal-sized task groups in one batched matmul instead of a Python loop over groups.
  Off the CPU that loop is launch-bound: an ``all_tasks`` training step (50 tasks) on an H100 went from 1,619 to
  8,859 samples/s. On the CPU the loop is as fast, so ``group_matmul="auto"`` batches off the CPU only.
* :class:`MaskedWeightCache`: acting keeps each task's masked weight ``W ⊙ M[t]`` between no-grad calls instead of
  rebuilding it for every layer at every environment step.

Both compute what the readable path computes (``tests/test_masked_linear.py`` compares them on every path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GROUP_MATMUL_MODES = ("auto", "loop", "batched")


def use_batched_groups(mode: str, x: torch.Tensor, group_sizes: Sequence[int]) -> bool:
    """Whether :func:`batched_group_linear` computes these groups: two or more of equal size, and ``mode`` is
    ``"batched"``, or ``"auto"`` off the CPU."""
    if mode not in GROUP_MATMUL_MODES:
        raise ValueError(f"group_matmul must be one of {GROUP_MATMUL_MODES}, got {mode!r}")
    if len(group_sizes) < 2 or len(set(group_sizes)) != 1:
        return False
    return mode == "batched" or (mode == "auto" and x.device.type != "cpu")


def batched_group_linear(x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x[g] @ weights[g]ᵀ + bias`` for ``G = len(weights)`` equal, contiguous groups of ``x``'s samples (dim 0)."""
    groups, out = weights.shape[0], weights.shape[1]
    x3 = x.reshape(groups, -1, x.shape[-1])
    y = torch.bmm(x3, weights.mT) if bias is None else torch.baddbmm(bias, x3, weights.mT)
    return y.reshape(*x.shape[:-1], out)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear computes in here: the autocast dtype when autocast is on, else the input's."""
    device = x.device.type
    if x.is_floating_point() and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class MaskedWeightCache:
    """Each task's masked weight ``W ⊙ M[t]`` (and the bias) in the compute dtype, kept between no-grad forwards
    (≈ 19 MB per task in float32 at the paper size). Emptied when the weight, the bias, the masks or the dtype change,
    and by any forward with gradients."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}
        self.bias: torch.Tensor | None = None
        self.key: tuple | None = None

    def lookup(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        masks: torch.Tensor,
        tasks: Sequence[int],
        dtype: torch.dtype,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The masked weights of ``tasks`` and the bias in ``dtype`` (each weight built on its first use)."""
        key = (
            weight._version,
            weight.data_ptr(),
            id(masks),
            None if bias is None else (bias._version, bias.data_ptr()),
        )
        if (key, dtype) != self.key:
            self.clear()
            self.key = (key, dtype)
            self.bias = bias.detach().to(dtype) if bias is not None else None  # a tensor, not a Parameter
        for task in tasks:
            if task not in self.weights:
                self.weights[task] = masks[task].to(dtype).mul_(weight.detach().to(dtype))
        return [self.weights[task] for task in tasks], self.bias
