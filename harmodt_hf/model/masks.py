"""Task masks as pure tensor functions: initialisation, storage and statistics.

HarmoDT keeps one binary mask per task over the transformer-body weights. This module holds what concerns the masks
themselves, with no I/O, no distributed code and no model classes (the outer loop's update of the masks is in
:mod:`harmodt_hf.training.harmony`):

* ERK initialisation: :func:`erk_densities`, :func:`erk_masks`;
* storage: :func:`pack_masks`, :func:`unpack_masks`;
* statistics: :func:`mask_density`, :func:`mask_overlap_counts`, :func:`pairwise_iou`, and the unseen-task
  :func:`merged_mask`.

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
    "mask_density",
    "mask_overlap_counts",
    "merged_mask",
    "pack_masks",
    "pairwise_iou",
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


_NOISE_BUDGET = 1 << 25  # float32 noise entries drawn at once by erk_masks (128 MiB)


def erk_masks(
    shapes: Mapping[str, tuple[int, ...]],
    num_tasks: int,
    sparsity: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Independent random ERK masks, one per task.

    Every task's layer keeps exactly ``round(density_l · numel_l)`` weights (a uniformly random subset: the entries
    with the smallest uniform noise, via ``torch.topk``), so the overall density is ``1 - sparsity`` up to per-layer
    rounding. The official code draws Bernoulli(density_l) entries instead (counts vary by a few hundred per layer).

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
        # The `count` entries with the smallest uniform noise form a uniformly random subset of exactly `count`
        # entries (topk returns exactly `count` indices, ties included). Draw the smaller of the kept / dropped sets.
        drop = numel - keep
        fill, count = (False, drop) if drop <= keep else (True, keep)
        flat = torch.full((num_tasks, numel), not fill, dtype=torch.bool, device=device)
        rows = max(1, _NOISE_BUDGET // numel)  # bound the float32 noise buffer; fixed per layer → deterministic
        for start in range(0, num_tasks, rows):
            block = flat[start : start + rows]
            noise = torch.rand(block.shape, generator=generator, device=device)
            block.scatter_(1, torch.topk(noise, count, dim=1, largest=False, sorted=False).indices, fill)
        masks[name] = flat.view(num_tasks, *shape)
    return masks


# ----------------------------------------------------------------------------------------------------------------
# Bit packing (storage of masks in safetensors)
# ----------------------------------------------------------------------------------------------------------------

_BIT_VALUES = tuple(1 << b for b in range(8))  # little bit order: element 8·j + b ↔ bit b of byte j


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """Bit-pack a ``(T, *param_shape)`` bool mask into a ``(T, ceil(numel / 8))`` uint8 tensor.

    Each task row is flattened (C order) and packed with **little** bit order: element ``8·j + b`` of the row is bit
    ``b`` (value ``1 << b``) of byte ``j`` (as ``numpy.packbits(..., bitorder="little")``). Padding bits of the last
    byte are 0. The leading dimension is kept; for a mask without a task dimension use ``mask.unsqueeze(0)``.
    """
    if masks.dim() < 1:
        raise ValueError("pack_masks expects a tensor with a leading task dimension, got a 0-d tensor")
    rows = masks.shape[0]
    bits = masks.reshape(rows, -1).to(torch.bool).to(torch.uint8)
    nbytes = (bits.shape[1] + 7) // 8
    bits = torch.nn.functional.pad(bits, (0, nbytes * 8 - bits.shape[1]))
    weights = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=bits.device)
    # one multiply and a uint8 sum per byte (exact: the sum of distinct bit values is at most 255)
    return (bits.view(rows, nbytes, 8) * weights).sum(dim=-1, dtype=torch.uint8)


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
    weights = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) & weights) != 0
    return bits.view(rows, nbytes * 8)[:, :numel].reshape(shape)


# ----------------------------------------------------------------------------------------------------------------
# Counts and statistics
# ----------------------------------------------------------------------------------------------------------------


def _num_tasks(tensors: Mapping[str, torch.Tensor], what: str) -> int:
    if not tensors:
        raise ValueError(f"{what} is empty")
    sizes = {t.shape[0] if t.dim() > 0 else None for t in tensors.values()}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"{what} must all have the same leading task dimension, got sizes {sorted(map(str, sizes))}")
    return int(next(iter(sizes)))


def _check_same_layout(ref: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], what: str) -> None:
    missing = [n for n in ref if n not in other]
    if missing:
        raise ValueError(f"{what} lacks entries for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, tensor in ref.items():
        if tuple(other[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{what}[{name!r}] has shape {tuple(other[name].shape)}, expected {tuple(tensor.shape)}")


def _row_counts(flat: torch.Tensor) -> torch.Tensor:
    """Number of True entries per row of a ``(T, N)`` bool tensor, int64."""
    return flat.sum(dim=1, dtype=torch.int64)


def mask_density(masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-task overall density (kept / total over all parameters), float64 tensor of shape ``(T,)``."""
    num_tasks = _num_tasks(masks, "masks")
    active = sum(_row_counts(m.reshape(num_tasks, -1).to(torch.bool)) for m in masks.values())
    total = sum(m[0].numel() for m in masks.values())
    return active.to(torch.float64) / total


_GRAM_COLUMNS = 1 << 24  # float32 sums of at most 2**24 ones are exact


def mask_overlap_counts(masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(T, T)`` float64: how many weights tasks i and j both keep, over all masks (the Gram matrix ``X Xᵀ`` of the
    flattened 0/1 task masks; its diagonal is each task's count). Exact: float32 matmuls over at most 2**24 columns
    at a time, summed in float64."""
    num_tasks = _num_tasks(masks, "masks")
    device = next(iter(masks.values())).device
    counts = torch.zeros(num_tasks, num_tasks, dtype=torch.float64, device=device)
    with torch.autocast(device.type, enabled=False):  # a bf16/fp16 matmul would not be exact
        for mask in masks.values():
            flat = mask.reshape(num_tasks, -1)
            for start in range(0, flat.shape[1], _GRAM_COLUMNS):
                block = flat[:, start : start + _GRAM_COLUMNS].to(torch.float32)
                counts += (block @ block.T).to(torch.float64)
    return counts


def pairwise_iou(masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Intersection over union of the flattened task masks, ``(T, T)`` float64. Two empty masks have IoU 1."""
    inter = mask_overlap_counts(masks)
    counts = inter.diagonal()  # |M_i ∩ M_i| = |M_i|
    union = counts[:, None] + counts[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def merged_mask(masks: Mapping[str, torch.Tensor], threshold: int) -> dict[str, torch.Tensor]:
    """Mask for unseen tasks: keep a weight where at least ``threshold`` of the T task masks keep it.

    Returns name -> bool tensor of the parameter's shape (no task dimension). ``threshold`` must be in [0, T]
    (official default 25 of 50 tasks).
    """
    num_tasks = _num_tasks(masks, "masks")
    if not 0 <= threshold <= num_tasks:
        raise ValueError(f"threshold must be in [0, {num_tasks}] (number of tasks), got {threshold}")
    return {
        name: m.to(torch.bool).contiguous().view(torch.uint8).sum(dim=0, dtype=torch.int32) >= threshold
        for name, m in masks.items()
    }
