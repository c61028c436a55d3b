"""HarmoDTModel against the transformers conventions (issue #20): initialisation of every tensor, buffers at
construction, config attribute names, hidden states and attention weights, attention backends, empty checkpoints and
flat prompt arguments."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import random_inputs, tiny_config, tiny_prompted_model
from safetensors.torch import load_file, save_file
from transformers import initialization
from transformers.utils import logging

from harmodt_hf import HarmoDTConfig, HarmoDTModel

logging.disable_progress_bar()
PARAMETER_NAMES = [name for name, _ in HarmoDTModel(tiny_config()).named_parameters()]


def _loaded_without(folder, key: str) -> HarmoDTModel:
    """The model saved in ``folder``, loaded from a copy of its weights that lacks ``key``."""
    weights = load_file(folder / "model.safetensors")
    del weights[key]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return HarmoDTModel.from_pretrained(folder)


@pytest.mark.parametrize("name", PARAMETER_NAMES)
def test_a_checkpoint_missing_any_weight_loads_it_initialised(tmp_path, name):
    """Each parameter missing in turn: it comes back from ``_init_weights`` with its initial distribution (not
    uninitialised memory), every other tensor as saved, and the actions are finite."""
    model = tiny_prompted_model(seed=3)
    model.save_pretrained(tmp_path)
    loaded = _loaded_without(tmp_path, name)
    value, saved = loaded.get_parameter(name).detach(), model.get_parameter(name).detach()
    assert torch.isfinite(value).all()
    module = loaded.get_submodule(name.rsplit(".", 1)[0])
    if isinstance(module, torch.nn.LayerNorm):  # ones and zeros
        assert torch.equal(value, torch.ones_like(value) if name.endswith("weight") else torch.zeros_like(value))
    elif name.startswith("transformer."):  # N(0, 0.02) weights, zero biases: as the body at construction
        if name.endswith("bias"):
            assert not value.any()
        else:
            assert 0.01 < float(value.std()) < 0.03 and not torch.equal(value, saved)
    elif isinstance(module, torch.nn.Embedding):  # N(0, 1)
        assert 0.8 < float(value.std()) < 1.2
    else:  # nn.Linear's own uniform(±1/sqrt(fan_in))
        bound = 1 / module.in_features**0.5
        assert float(value.abs().max()) <= bound and float(value.abs().max()) > bound / 4
    for other, tensor in model.state_dict().items():
        if other != name:
            assert torch.equal(loaded.state_dict()[other], tensor), other
    inputs = random_inputs(loaded.config, [2, 0, 1])
    with torch.no_grad():
        assert torch.isfinite(loaded(**inputs).action_preds).all()


def test_task_masks_after_init_equal_those_of_init_weights():
    """The masks are buffers: drawn in ``__init__`` (also when transformers skips ``init_weights``) as
    ``init_weights`` draws them on a model built on the meta device, and as a load from an empty checkpoint does."""
    config = tiny_config()
    with initialization.no_init_weights():
        from_init = HarmoDTModel(copy.deepcopy(config))
    with torch.device("meta"):
        from_meta = HarmoDTModel(copy.deepcopy(config))
    from_meta.to_empty(device="cpu")
    from_meta.init_weights()
    from_empty = HarmoDTModel.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
    buffers = dict(from_init.named_buffers())
    assert any(name.endswith("packed_masks") for name in buffers)
    for other in (from_meta, from_empty):
        other_buffers = dict(other.named_buffers())
        assert other_buffers.keys() == buffers.keys()
        for name, buffer in buffers.items():
            assert torch.equal(other_buffers[name], buffer), name
    density = sum(int(m[0].sum()) for m in from_init.get_task_masks().values()) / from_init.num_masked_parameters()
    assert abs(density - (1 - config.sparsity)) < 0.01  # real ERK masks, not the zeros a buffer starts from


def test_an_empty_checkpoint_loads_as_a_new_model_and_reports_every_key_missing():
    """``from_pretrained(None, config=..., state_dict={})``: every tensor reported missing, masks drawn from the
    config's mask seed, nothing left uninitialised; weights without masks stay refused (test_model.py)."""
    model, info = HarmoDTModel.from_pretrained(None, config=tiny_config(), state_dict={}, output_loading_info=True)
    assert set(info["missing_keys"]) == set(model.state_dict()) - {"task_name_crc32"}
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    fresh = HarmoDTModel(tiny_config())
    for name, masks in fresh.get_task_masks().items():
        assert torch.equal(model.get_task_masks()[name], masks)


def test_config_has_the_transformers_attribute_names():
    config = HarmoDTConfig(n_head=4, n_layer=3, hidden_size=64)
    assert (config.num_attention_heads, config.num_hidden_layers) == (4, 3)
    renamed = HarmoDTConfig(num_attention_heads=2, num_hidden_layers=5, hidden_size=64)
    assert (renamed.n_head, renamed.n_layer) == (2, 5)
    assert len(HarmoDTModel(tiny_config(num_hidden_layers=3)).transformer.h) == 3
    for field in ("context_length", "target_returns", "state_mean", "state_std"):
        assert field in HarmoDTConfig.__doc__.split("are not read by ``forward``")[0].rsplit("\n\n", 1)[-1]


def test_hidden_states_follow_the_config_and_receive_gradients_in_a_mixed_batch():
    """``config.output_hidden_states`` turns them on; with unsorted task ids they are in the caller's order (each
    sample's equal to the sample run alone) and gradients from the actions reach them, and the attention weights."""
    model = tiny_prompted_model(output_hidden_states=True).train()
    task_ids = [2, 0, 1, 0]
    inputs = random_inputs(model.config, task_ids, seed=4)
    output = model(**inputs, output_attentions=True)
    hidden, attentions = output.hidden_states, output.attentions
    assert len(hidden) == model.config.n_layer + 1 and len(attentions) == model.config.n_layer
    assert hidden[-1] is output.last_hidden_state
    for tensor in (*hidden, *attentions):
        tensor.retain_grad()
    output.action_preds[1].sum().backward()  # sample 1 only: task 0, sorted first
    for tensor in (*hidden, *attentions):
        assert tensor.grad is not None and tensor.grad[1].abs().sum() > 0
        assert not tensor.grad[[0, 2, 3]].any()  # the other samples' rows do not feed sample 1's actions
    with torch.no_grad():
        for i in range(len(task_ids)):
            alone = model(**{k: v[i : i + 1] for k, v in inputs.items() if k != "prompt"},
                          prompt={k: v[i : i + 1] for k, v in inputs["prompt"].items()})  # fmt: skip
            for a, b in zip(alone.hidden_states, hidden, strict=True):
                torch.testing.assert_close(a[0], b[i], atol=1e-5, rtol=0)
    model.config.output_hidden_states = False
    assert model(**inputs).hidden_states is None


def test_eager_attention_gives_the_sdpa_actions_and_the_attention_weights(tmp_path):
    model = tiny_prompted_model(seed=5)
    model.save_pretrained(tmp_path)
    eager = HarmoDTModel.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager" and model.config._attn_implementation == "sdpa"
    inputs = random_inputs(model.config, [2, 0, 1, 0], seed=6)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
        )
        expected = model(**inputs).action_preds
        assert calls  # the default computes through SDPA...
        calls.clear()
        actions = eager(**inputs).action_preds
        output = eager(**inputs, output_attentions=True)
        assert not calls  # ...eager never calls it
    torch.testing.assert_close(actions, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(output.action_preds, expected, atol=1e-6, rtol=0)
    weights = output.attentions[0]
    tokens = 3 * (model.config.prompt_length + model.config.context_length)
    assert weights.shape == (4, model.config.n_head, tokens, tokens)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    assert not weights.triu(diagonal=1).any()  # causal
    padded = 3 * model.config.prompt_length  # random_inputs left-pads sample 0's first step
    assert not weights[0, :, :, padded : padded + 3].any()
    with torch.no_grad():  # an SDPA model asked for the weights computes that call eagerly
        torch.testing.assert_close(model(**inputs, output_attentions=True).attentions[1], output.attentions[1])


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flex_attention"])
def test_other_attention_backends_are_refused_when_the_model_is_built(implementation):
    with pytest.raises(ValueError, match="attn_implementation='sdpa' or 'eager'"):
        HarmoDTModel(tiny_config(attn_implementation=implementation))


def test_flat_prompt_arguments_equal_the_prompt_dict():
    """``prompt_states=...`` & co. (top-level tensors a generic batching utility can slice) act as ``prompt=``."""
    model = tiny_prompted_model(seed=7)
    inputs = random_inputs(model.config, [1, 0, 2], seed=8)
    prompt = inputs.pop("prompt")
    with torch.no_grad():
        expected = model(**inputs, prompt=prompt).action_preds
        flat = model(**inputs, **{f"prompt_{k}": v for k, v in prompt.items()}).action_preds
        without_mask = model(**inputs, **{f"prompt_{k}": v for k, v in prompt.items() if k != "attention_mask"})
    assert torch.equal(flat, expected) and torch.equal(without_mask.action_preds, expected)
    with pytest.raises(ValueError, match="pass the prompt once"):
        model(**inputs, prompt=prompt, prompt_states=prompt["states"])
