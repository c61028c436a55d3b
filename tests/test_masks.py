"""Tests for harmodt_hf.model.masks: ERK densities and masks, bit packing, counts, merged masks, density, IoU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import bool_tensor

from harmodt_hf.model import masks as masks_module
from harmodt_hf.model.masks import (
    _row_counts,
    erk_densities,
    erk_masks,
    mask_density,
    mask_overlap_counts,
    merged_mask,
    pack_masks,
    pairwise_iou,
    unpack_masks,
)

D = 256


def block_shapes(n_layer: int = 6, d: int = D) -> dict[str, tuple[int, ...]]:
    """The four weight matrices of each GPT-2 block (nn.Linear orientation)."""
    shapes = {}
    for layer in range(n_layer):
        shapes[f"h.{layer}.attn.c_attn.weight"] = (3 * d, d)
        shapes[f"h.{layer}.attn.c_proj.weight"] = (d, d)
        shapes[f"h.{layer}.mlp.c_fc.weight"] = (4 * d, d)
        shapes[f"h.{layer}.mlp.c_proj.weight"] = (d, 4 * d)
    return shapes


def official_shapes(d: int = D) -> dict[str, tuple[int, ...]]:
    """All parameters of the official Prompt-DT model (MT50 defaults), in named_parameters order."""
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (1, d)}
    for layer in range(6):
        p = f"transformer.h.{layer}."
        shapes.update(
            {
                p + "ln_1.weight": (d,),
                p + "ln_1.bias": (d,),
                p + "attn.c_attn.weight": (d, 3 * d),
                p + "attn.c_attn.bias": (3 * d,),
                p + "attn.c_proj.weight": (d, d),
                p + "attn.c_proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
                p + "mlp.c_fc.weight": (d, 4 * d),
                p + "mlp.c_fc.bias": (4 * d,),
                p + "mlp.c_proj.weight": (4 * d, d),
                p + "mlp.c_proj.bias": (d,),
            }
        )
    shapes.update({"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)})
    shapes.update(
        {
            "embed_timestep.weight": (1000, d),
            "embed_return.weight": (d, 1),
            "embed_return.bias": (d,),
            "embed_ln.weight": (d,),
            "embed_ln.bias": (d,),
            "predict_return.weight": (1, d),
            "predict_return.bias": (1,),
            "embed_state.weight": (d, 39),
            "embed_state.bias": (d,),
            "embed_action.weight": (d, 4),
            "embed_action.bias": (d,),
            "predict_state.weight": (39, d),
            "predict_state.bias": (39,),
            "predict_action.0.weight": (4, d),
            "predict_action.0.bias": (4,),
            "prompt_embed_state.weight": (d, 39),
            "prompt_embed_state.bias": (d,),
            "prompt_embed_action.weight": (d, 4),
            "prompt_embed_action.bias": (d,),
            "prompt_predict_action.weight": (d, 4),
            "prompt_predict_action.bias": (d,),
            "prompt_embed_timestep.weight": (1000, d),
            "prompt_embed_return.weight": (d, 1),
            "prompt_embed_return.bias": (d,),
        }
    )
    return shapes


def overall_density(densities: dict[str, float], shapes: dict[str, tuple[int, ...]]) -> float:
    total = sum(math.prod(s) for s in shapes.values())
    return sum(densities[n] * math.prod(s) for n, s in shapes.items()) / total


# ---------------------------------------------------------------------------------------------------------------
# ERK
# ---------------------------------------------------------------------------------------------------------------


def test_erk_densities_gpt2_blocks():
    shapes = block_shapes()
    dens = erk_densities(shapes, 0.8)
    assert list(dens) == list(shapes)
    for layer in range(6):
        assert dens[f"h.{layer}.attn.c_proj.weight"] == 1.0
        assert dens[f"h.{layer}.attn.c_attn.weight"] == pytest.approx(0.819, abs=1e-3)
        assert dens[f"h.{layer}.mlp.c_fc.weight"] == pytest.approx(0.768, abs=1e-3)
        assert dens[f"h.{layer}.mlp.c_proj.weight"] == pytest.approx(0.768, abs=1e-3)
    assert overall_density(dens, shapes) == pytest.approx(0.8, abs=1e-9)


def test_erk_densities_official_model_matches_reference_numbers():
    shapes = official_shapes()
    dens = erk_densities(shapes, 0.8)
    sparse = {n for n, v in dens.items() if v < 1.0}
    assert sparse == {n for n in shapes if ("c_attn.weight" in n or ("mlp.c_" in n and "weight" in n))} | {
        "embed_timestep.weight",
        "prompt_embed_timestep.weight",
    }
    assert dens["transformer.h.0.attn.c_attn.weight"] == pytest.approx(0.8197, abs=5e-5)
    assert dens["transformer.h.3.mlp.c_fc.weight"] == pytest.approx(0.7685, abs=5e-5)
    assert dens["transformer.h.5.mlp.c_proj.weight"] == pytest.approx(0.7685, abs=5e-5)
    assert dens["embed_timestep.weight"] == pytest.approx(0.7722, abs=5e-5)
    # 1-D parameters and small layers are dense.
    assert all(dens[n] == 1.0 for n, s in shapes.items() if len(s) == 1)
    assert dens["transformer.h.0.attn.c_proj.weight"] == 1.0
    assert dens["embed_state.weight"] == 1.0
    assert overall_density(dens, shapes) == pytest.approx(0.8, abs=1e-9)


def test_erk_densities_edge_cases():
    shapes = {"a": (64, 32), "b": (32,), "c": ()}
    assert erk_densities(shapes, 1.0) == {"a": 1.0, "b": 1.0, "c": 1.0}
    dens = erk_densities(shapes, 0.5)
    assert dens["b"] == 1.0 and dens["c"] == 1.0 and 0 < dens["a"] < 0.5
    assert overall_density(dens, shapes) == pytest.approx(0.5)
    # power scale 0 gives uniform raw probabilities (all layers equal when nothing saturates)
    uniform = erk_densities({"a": (64, 32), "b": (16, 16)}, 0.3, erk_power_scale=0.0)
    assert uniform["a"] == pytest.approx(0.3) and uniform["b"] == pytest.approx(0.3)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="density"):
            erk_densities(shapes, bad)


def test_erk_masks_exact_counts_and_overall_density():
    shapes = official_shapes(d=64)
    dens = erk_densities(shapes, 0.8)
    masks = erk_masks(shapes, num_tasks=7, sparsity=0.2, generator=torch.Generator().manual_seed(0))
    assert list(masks) == list(shapes)
    total = active = 0
    for name, shape in shapes.items():
        m = masks[name]
        assert m.dtype == torch.bool and tuple(m.shape) == (7, *shape)
        expected = round(dens[name] * math.prod(shape))
        counts = m.reshape(7, -1).sum(1)
        assert counts.tolist() == [expected] * 7, name
        total += math.prod(shape)
        active += expected
    assert abs(active / total - 0.8) < 0.005
    # small / 1-D layers dense; masks differ between tasks
    assert masks["transformer.h.0.ln_1.weight"].all()
    assert masks["transformer.h.0.attn.c_proj.weight"].all()
    w = masks["transformer.h.0.mlp.c_fc.weight"]
    assert not torch.equal(w[0], w[1])


def test_erk_masks_determinism_and_sparsity_zero():
    shapes = block_shapes(n_layer=2, d=32)
    a = erk_masks(shapes, 5, 0.3, generator=torch.Generator().manual_seed(123))
    b = erk_masks(shapes, 5, 0.3, generator=torch.Generator().manual_seed(123))
    c = erk_masks(shapes, 5, 0.3, generator=torch.Generator().manual_seed(124))
    assert all(torch.equal(a[n], b[n]) for n in shapes)
    assert not all(torch.equal(a[n], c[n]) for n in shapes)
    full = erk_masks(shapes, 3, 0.0)
    assert all(m.all() and m.shape[0] == 3 for m in full.values())
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="sparsity"):
            erk_masks(shapes, 3, bad)
    with pytest.raises(ValueError, match="num_tasks"):
        erk_masks(shapes, 0, 0.2)


# ---------------------------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 1), (3, 7), (2, 8), (4, 13), (5, 3, 11), (1, 17, 4), (2, 3, 1, 9), (3, 64, 4)])
def test_pack_unpack_round_trip(shape):
    g = torch.Generator().manual_seed(sum(shape))
    m = torch.rand(shape, generator=g) < 0.5
    packed = pack_masks(m)
    numel = math.prod(shape[1:])
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (shape[0], (numel + 7) // 8)
    assert torch.equal(unpack_masks(packed, shape), m)
    # little bit order, as numpy.packbits(bitorder="little"), padding bits zero
    ref = np.packbits(m.reshape(shape[0], -1).numpy(), axis=1, bitorder="little")
    assert np.array_equal(packed.numpy(), ref)


def test_pack_bit_order_and_errors():
    m = torch.zeros(1, 10, dtype=torch.bool)
    m[0, 0] = m[0, 3] = m[0, 9] = True
    assert pack_masks(m).tolist() == [[0b00001001, 0b00000010]]
    assert pack_masks(torch.ones(2, 9, dtype=torch.bool)).tolist() == [[255, 1], [255, 1]]
    assert pack_masks(torch.ones(1, 16, dtype=torch.bool)).tolist() == [[255, 255]]  # the top bit of every byte
    assert pack_masks(m[:, :8]).tolist() == [[0b00001001]]
    with pytest.raises(ValueError, match="do not match"):
        unpack_masks(pack_masks(m), (1, 17))
    with pytest.raises(ValueError, match="uint8"):
        unpack_masks(pack_masks(m).to(torch.int32), (1, 10))


# ---------------------------------------------------------------------------------------------------------------
# Merged mask, density, IoU
# ---------------------------------------------------------------------------------------------------------------


def test_merged_mask_threshold():
    masks = {
        "w": bool_tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 1]]),
        "b": bool_tensor([[1], [0], [0], [0]]),
    }
    assert merged_mask(masks, 2)["w"].tolist() == [True, True, False, False]
    assert merged_mask(masks, 1)["w"].tolist() == [True, True, True, True]
    assert merged_mask(masks, 4)["w"].tolist() == [True, False, False, False]
    assert merged_mask(masks, 0)["b"].tolist() == [True]
    assert merged_mask(masks, 2)["b"].tolist() == [False]
    assert merged_mask(masks, 2)["w"].dtype == torch.bool
    with pytest.raises(ValueError, match="threshold"):
        merged_mask(masks, 5)


def test_row_counts_match_bool_sums_for_any_layout():
    """Row counts equal ``bool.sum`` for full, sliced, empty and all-true rows."""
    g = torch.Generator().manual_seed(3)
    masks = torch.rand((6, 4096), generator=g) < 0.8
    for tensor in (masks, masks[:, :13], masks[:, 3:67], masks[2:], masks[:, :0], torch.ones(3, 64, dtype=torch.bool)):
        assert torch.equal(_row_counts(tensor), tensor.sum(dim=1)), tuple(tensor.shape)


def test_mask_density():
    masks = {"w": bool_tensor([[1, 1, 1, 0], [0, 0, 0, 0]]), "b": bool_tensor([[[1, 0]], [[1, 1]]])}
    assert mask_density(masks).tolist() == pytest.approx([4 / 6, 2 / 6])


@pytest.mark.parametrize("columns", [3, 1 << 24], ids=["3-column-chunks", "one-chunk"])
def test_pairwise_iou_brute_force(columns, monkeypatch):
    """IoU of every pair against a Python count, also when the Gram matmuls run over chunks of 3 columns."""
    monkeypatch.setattr(masks_module, "_GRAM_COLUMNS", columns)
    g = torch.Generator().manual_seed(5)
    masks = {"w": torch.rand(6, 7, 5, generator=g) < 0.5, "b": torch.rand(6, 11, generator=g) < 0.3}
    masks["w"][4] = False  # an empty-ish task
    masks["b"][4] = False
    masks["w"][5] = masks["w"][0]
    masks["b"][5] = masks["b"][0]
    iou = pairwise_iou(masks)
    flat = torch.cat([masks["w"].reshape(6, -1), masks["b"]], 1).tolist()
    for i in range(6):
        for j in range(6):
            inter = sum(a and b for a, b in zip(flat[i], flat[j], strict=True))
            union = sum(a or b for a, b in zip(flat[i], flat[j], strict=True))
            expected = inter / union if union else 1.0
            assert iou[i, j].item() == pytest.approx(expected, abs=1e-12)
    assert iou[0, 5] == 1.0 and iou[4, 4] == 1.0 and iou[4, 0] == 0.0


def test_mask_overlap_counts_are_exact_integers_beyond_float32_precision():
    """Counts above 2**24 (where float32 stops counting ones exactly) come out exact: the diagonal is each task's
    number of kept weights, the off-diagonal the weights both tasks keep."""
    masks = {"big": torch.ones(2, (1 << 24) + 3, dtype=torch.bool), "small": bool_tensor([[1, 0, 1], [1, 1, 0]])}
    masks["big"][1, :5] = False
    counts = mask_overlap_counts(masks)
    big = (1 << 24) + 3
    assert counts.dtype == torch.float64
    assert counts.tolist() == [[big + 2, big - 5 + 1], [big - 5 + 1, big - 5 + 2]]
