"""The outer loop's mathematics as pure tensor functions.

HarmoDT keeps one binary mask per task over the transformer-body weights. This module holds everything the
outer (mask) loop computes, with no I/O, no distributed code and no model classes:

* ERK initialisation: :func:`erk_densities`, :func:`erk_masks`;
* scores: :func:`agreement_scores`, :func:`importance_scores`, :func:`harmony_scores`;
* selection: :func:`select_prune_regrow` (the intended algorithm, rule ``"harmony"``) and
  :func:`reference_prune_regrow` (the official numerics, flaws included, rule ``"reference"``);
* the η schedule :func:`prune_count`, the unseen-task :func:`merged_mask`;
* helpers: :func:`mask_density`, :func:`pairwise_iou`, :func:`pack_masks`, :func:`unpack_masks`.

Conventions: masks are dicts ``name -> bool tensor (num_tasks, *param_shape)``; parameters are dicts
``name -> tensor (*param_shape)``; per-task gradients and scores are dicts ``name -> tensor (num_tasks,
*param_shape)``. Selection is global over all parameters of a dict, in the dict's iteration order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = [
    "erk_densities",
    "erk_masks",
    "pack_masks",
    "unpack_masks",
]


# ----------------------------------------------------------------------------------------------------------------
# ERK initialisation
# ----------------------------------------------------------------------------------------------------------------


def erk_densities(
    shapes: Mapping[str, tuple[int, ...]], density: float, erk_power_scale: float = 1.0
) -> dict[str, float]:
    """Per-layer densities of the Erdős–Rényi-Kernel distribution with overall density ``density``.

    A layer's raw probability is ``(sum(shape) / prod(shape)) ** erk_power_scale``; one factor ε scales all raw
    probabilities so that ``Σ density_l · numel_l = density · Σ numel_l``. While some layer would get a density
    above 1, the layer(s) with the largest raw probability become dense and ε is solved again (as the official
    ``ERK_maskinit`` does: one maximum at a time). 1-D parameters have raw probability 1, the largest possible for
    a weight with dims ≥ 1, so they become dense first; 0-d parameters are dense.

    Args:
        shapes: parameter name -> shape (without the task dimension).
        density: target overall density (fraction of weights kept), in (0, 1].
        erk_power_scale: exponent applied to the raw probabilities (1.0 = plain ERK).

    Returns:
        name -> density in (0, 1], in the iteration order of ``shapes``.
    """
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    numels: dict[str, int] = {}
    raw: dict[str, float] = {}
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        if n <= 0:
            raise ValueError(f"parameter {name!r} has no elements (shape {shape})")
        numels[name] = n
        raw[name] = (sum(shape) / n) ** erk_power_scale if len(shape) > 0 else math.inf
    if density == 1.0:
        return {name: 1.0 for name in shapes}

    dense: set[str] = set()
    while True:
        sparse = [name for name in numels if name not in dense]
        if not sparse:  # everything became dense: cannot happen for density < 1, kept as a guard
            break
        rhs = sum(density * numels[n] for n in sparse) - sum((1.0 - density) * numels[n] for n in dense)
        divisor = sum(raw[n] * numels[n] for n in sparse)
        max_raw = max(raw[n] for n in sparse)
        epsilon = rhs / divisor if math.isfinite(max_raw) else 0.0
        if not math.isfinite(max_raw) or epsilon * max_raw > 1.0:
            dense.update(n for n in sparse if raw[n] == max_raw)
            continue
        break
    return {name: 1.0 if name in dense else epsilon * raw[name] for name in shapes}


def erk_masks(
    shapes: Mapping[str, tuple[int, ...]],
    num_tasks: int,
    sparsity: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Independent random ERK masks, one per task.

    Every task's layer keeps exactly ``round(density_l · numel_l)`` weights (a uniformly random subset, drawn with
    ``torch.randperm``), so the overall density is ``1 - sparsity`` up to per-layer rounding. The official code
    draws Bernoulli(density_l) entries instead (the counts vary by a few hundred per layer).

    Args:
        shapes: parameter name -> shape (without the task dimension).
        num_tasks: number of tasks T (≥ 1).
        sparsity: fraction of weights masked out overall, in [0, 1); 0 gives all-True masks.
        generator: random generator; the masks are created on its device (CPU when None). Same seed, same masks.

    Returns:
        name -> bool tensor of shape ``(num_tasks, *shape)``.
    """
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    device = generator.device if generator is not None else torch.device("cpu")
    densities = erk_densities(shapes, 1.0 - sparsity)
    masks: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        keep = min(numel, max(0, round(densities[name] * numel)))
        if keep == numel:
            masks[name] = torch.ones((num_tasks, *shape), dtype=torch.bool, device=device)
            continue
        # Draw the smaller of the kept / dropped sets: same cost (one permutation per task), fewer writes.
        drop = numel - keep
        fill, count = (False, drop) if drop <= keep else (True, keep)
        flat = torch.full((num_tasks, numel), not fill, dtype=torch.bool, device=device)
        for task in range(num_tasks):
            idx = torch.randperm(numel, generator=generator, device=device)[:count]
            flat[task, idx] = fill
        masks[name] = flat.view(num_tasks, *shape)
    return masks


# ----------------------------------------------------------------------------------------------------------------
# Bit packing (storage of masks in safetensors)
# ----------------------------------------------------------------------------------------------------------------

_BIT_SHIFTS = tuple(range(8))


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """Bit-pack a ``(T, *param_shape)`` bool mask into a ``(T, ceil(numel / 8))`` uint8 tensor.

    Each task row is flattened (C order) and packed with **little** bit order: element ``8·j + b`` of the row is bit
    ``b`` (value ``1 << b``) of byte ``j`` (as ``numpy.packbits(..., bitorder="little")``). Padding bits of the last
    byte are 0. The leading dimension is kept; for a mask without a task dimension use ``mask.unsqueeze(0)``.
    """
    if masks.dim() < 1:
        raise ValueError("pack_masks expects a tensor with a leading task dimension, got a 0-d tensor")
    rows = masks.shape[0]
    flat = masks.reshape(rows, -1).to(torch.bool)
    numel = flat.shape[1]
    nbytes = (numel + 7) // 8
    pad = nbytes * 8 - numel
    if pad:
        flat = torch.cat([flat, flat.new_zeros(rows, pad)], dim=1)
    bits = flat.view(rows, nbytes, 8).to(torch.uint8)
    packed = bits[:, :, 0].clone()
    for b in _BIT_SHIFTS[1:]:
        packed |= bits[:, :, b] << b
    return packed


def unpack_masks(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_masks`: ``(T, ceil(numel / 8))`` uint8 -> bool tensor of ``shape = (T, *param_shape)``.

    Raises ``ValueError`` when the packed tensor's dtype or size does not match ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1:
        raise ValueError("unpack_masks expects a shape with a leading task dimension")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed masks must be uint8, got {packed.dtype}")
    rows = shape[0]
    numel = math.prod(shape[1:])
    nbytes = (numel + 7) // 8
    if tuple(packed.shape) != (rows, nbytes):
        raise ValueError(
            f"packed masks of shape {tuple(packed.shape)} do not match mask shape {shape} "
            f"(expected packed shape {(rows, nbytes)})"
        )
    shifts = torch.tensor(_BIT_SHIFTS, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.view(rows, nbytes * 8)[:, :numel].to(torch.bool).reshape(shape)
