"""HarmoDTConfig / HarmoDTModel: architecture, masks, serialisation and input checks on real objects."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import TASKS, random_inputs, small_matmuls_follow_row_count, tiny_config
from safetensors import safe_open
from transformers import AutoConfig, AutoModel
from transformers.utils import logging

import harmodt_hf  # noqa: F401  (registers the Auto classes)
from harmodt_hf import HarmoDTConfig, HarmoDTModel

logging.disable_progress_bar()


@pytest.fixture(scope="module")
def model() -> HarmoDTModel:
    torch.manual_seed(0)
    return HarmoDTModel(tiny_config()).eval()


def _outputs(model, inputs):
    with torch.no_grad():
        return model(**inputs).action_preds


# ------------------------------------------------------------------------------------------------ serialisation
@pytest.mark.parametrize("mask_mode", ["harmony", "none"])
def test_save_and_load_round_trip(tmp_path, mask_mode):
    torch.manual_seed(1)
    model = HarmoDTModel(tiny_config(mask_mode=mask_mode, use_prompt=mask_mode == "harmony")).eval()
    inputs = random_inputs(model.config, [0, 2, 1, 0])
    model.save_pretrained(tmp_path)
    loaded = HarmoDTModel.from_pretrained(tmp_path)
    auto = AutoModel.from_pretrained(tmp_path)
    assert isinstance(auto, HarmoDTModel)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), HarmoDTConfig)
    for other in (loaded, auto):
        unnamed = {"_name_or_path": ""}
        assert other.config.to_diff_dict() | unnamed == model.config.to_diff_dict() | unnamed
        torch.testing.assert_close(_outputs(other, inputs), _outputs(model, inputs), rtol=0, atol=0)
        state, other_state = model.state_dict(), other.state_dict()
        assert state.keys() == other_state.keys()
        for key in state:
            assert torch.equal(state[key], other_state[key]), key
        for name, masks in model.get_task_masks().items():
            assert torch.equal(other.get_task_masks()[name], masks)


def test_round_trip_after_mask_change(tmp_path, model):
    """Masks edited after construction (as the trainer does) are what is saved and loaded."""
    masks = {name: m.clone() for name, m in model.get_task_masks().items()}
    first = next(iter(masks))
    masks[first][0] = ~masks[first][0]
    model.set_task_masks(masks)
    assert torch.equal(model.get_task_masks()[first], masks[first])
    expected = masks[first].clone()
    masks[first][1] = ~masks[first][1]  # the model copied the masks: editing the caller's tensor changes nothing
    assert torch.equal(model.get_task_masks()[first], expected)
    masks[first][1] = ~masks[first][1]
    model.save_pretrained(tmp_path)
    loaded = HarmoDTModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.get_task_masks()[first], masks[first])


def test_bfloat16_load_keeps_masks(tmp_path, model):
    model.save_pretrained(tmp_path)
    loaded = HarmoDTModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    for name, masks in model.get_task_masks().items():
        assert torch.equal(loaded.get_task_masks()[name], masks)


def test_masks_are_bit_packed_in_safetensors(tmp_path, model):
    model.save_pretrained(tmp_path)
    num_tasks = model.config.num_tasks
    mask_bytes = 0
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        for key in f.keys():
            if "packed_masks" in key:
                tensor = f.get_tensor(key)
                assert tensor.dtype == torch.uint8
                mask_bytes += tensor.numel() * tensor.element_size()
    bound = model.num_masked_parameters() * num_tasks / 8
    assert 0 < mask_bytes <= bound * 1.01 + 1


def test_checkpoint_without_masks_is_refused(tmp_path):
    HarmoDTModel(tiny_config(mask_mode="none")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["mask_mode"] = "harmony"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="task masks"):
        HarmoDTModel.from_pretrained(tmp_path)


def test_checkpoint_with_other_task_count_is_refused(tmp_path, model):
    model.save_pretrained(tmp_path)
    config = tiny_config(task_names=TASKS[:2])
    with pytest.raises(ValueError, match="task count"):
        HarmoDTModel.from_pretrained(tmp_path, config=config)


# ------------------------------------------------------------------------------------------------ masks
def test_erk_densities_at_paper_size():
    model = HarmoDTModel(HarmoDTConfig(task_names=TASKS[:2], sparsity=0.2))
    masks = model.get_task_masks()
    total = sum(m[0].numel() for m in masks.values())
    for task in range(2):
        active = sum(int(m[task].sum()) for m in masks.values())
        assert abs(active / total - 0.8) < 0.005
    density = {name: m[0].float().mean().item() for name, m in masks.items()}
    assert density["transformer.h.0.attn.c_proj.weight"] == 1.0  # smallest layer: dense under ERK
    assert density["transformer.h.0.attn.c_attn.weight"] == pytest.approx(0.819, abs=0.002)
    assert density["transformer.h.0.mlp.c_fc.weight"] == pytest.approx(0.768, abs=0.002)
    assert density["transformer.h.0.mlp.c_proj.weight"] == pytest.approx(0.768, abs=0.002)
    # masks differ between tasks (independent draws) yet have the same count
    first = masks["transformer.h.0.mlp.c_fc.weight"]
    assert not torch.equal(first[0], first[1]) and first[0].sum() == first[1].sum()


@pytest.mark.parametrize("use_prompt", [True, False])
def test_masks_are_drawn_with_and_without_prompts(use_prompt):
    model = HarmoDTModel(tiny_config(use_prompt=use_prompt))
    density = sum(int(m[1].sum()) for m in model.get_task_masks().values()) / model.num_masked_parameters()
    assert abs(density - 0.8) < 0.01


def test_mask_init_is_seeded():
    a = HarmoDTModel(tiny_config(mask_seed=3)).get_task_masks()
    b = HarmoDTModel(tiny_config(mask_seed=3)).get_task_masks()
    c = HarmoDTModel(tiny_config(mask_seed=4)).get_task_masks()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_only_body_weights_are_masked(model):
    names = set(model.get_task_masks())
    assert names and all(n.startswith("transformer.h.") and n.endswith(".weight") for n in names)
    assert not any("embed" in n or "predict" in n for n in names)


# ------------------------------------------------------------------------------------------------ behaviour
def test_tasks_give_different_actions(model):
    inputs = random_inputs(model.config, [0])
    same = {k: v for k, v in inputs.items() if k != "task_ids"}
    a = _outputs(model, {**same, "task_ids": torch.tensor([0])})
    b = _outputs(model, {**same, "task_ids": torch.tensor([1])})
    assert not torch.allclose(a, b, atol=1e-4)


def test_mask_mode_none_ignores_task_ids():
    model = HarmoDTModel(tiny_config(mask_mode="none", use_prompt=False)).eval()
    inputs = random_inputs(model.config, [0, 1])
    a = _outputs(model, inputs)
    b = _outputs(model, {**inputs, "task_ids": torch.tensor([2, 2])})
    c = _outputs(model, {k: v for k, v in inputs.items() if k != "task_ids"})
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not model.get_task_masks()


def test_mixed_batch_equals_samples_alone(model):
    task_ids = [2, 0, 1, 0, 2, 2, 1]
    inputs = random_inputs(model.config, task_ids, seed=5)
    mixed = _outputs(model, inputs)
    for i in range(len(task_ids)):
        single = {k: v[i : i + 1] for k, v in inputs.items() if k != "prompt"}
        single["prompt"] = {k: v[i : i + 1] for k, v in inputs["prompt"].items()}
        torch.testing.assert_close(_outputs(model, single), mixed[i : i + 1], atol=1e-5, rtol=0)


def test_masked_weight_cache_gives_identical_actions(model):
    inputs = random_inputs(model.config, [2, 0, 1, 2], seed=7)
    expected = _outputs(model, inputs)
    model.cache_masked_weights(True)
    try:
        torch.testing.assert_close(_outputs(model, inputs), expected, rtol=0, atol=0)
        masks = {name: m.clone() for name, m in model.get_task_masks().items()}
        first = next(iter(masks))
        masks[first][2] = ~masks[first][2]
        model.set_task_masks(masks)  # the cache must follow the new masks
        changed = _outputs(model, inputs)
        model.cache_masked_weights(False)
        torch.testing.assert_close(changed, _outputs(model, inputs), rtol=0, atol=0)
        assert not torch.equal(changed[0], expected[0])
    finally:
        model.cache_masked_weights(False)
        masks[first][2] = ~masks[first][2]
        model.set_task_masks(masks)


def test_masked_weight_cache_under_bf16_autocast_is_cast_once(model):
    """Under bf16 autocast the cache holds bf16 masked weights, built at the first call and reused after (no cast per
    call), with the same outputs as the uncached autocast forward."""
    inputs = random_inputs(model.config, [2, 0, 1, 2], seed=8)
    layer = model.transformer.h[0].mlp.c_fc
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _outputs(model, inputs)
        model.cache_masked_weights(True)
        try:
            first = _outputs(model, inputs)
            cached = dict(layer.weight_cache.weights)
            second = _outputs(model, inputs)
            assert sorted(cached) == [0, 1, 2] and all(w.dtype == torch.bfloat16 for w in cached.values())
            assert all(layer.weight_cache.weights[t] is w for t, w in cached.items())  # reused, not rebuilt or recast
        finally:
            model.cache_masked_weights(False)
    assert first.dtype == torch.bfloat16
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
    assert not layer.weight_cache.weights and layer.weight_cache.bias is None
    assert set(dict(layer.named_parameters())) == {"weight", "bias"}  # the cached copies are no parameters


def test_encoded_prompt_gives_the_actions_of_the_prompt_tokens(model):
    """encode_prompt once, then prompt_key_values=...: the same actions as feeding the prompt tokens, for an unsorted
    mixed batch with left padding in the prompt and the steps, and without building the prompt tokens again."""
    task_ids = [2, 0, 1, 0, 2]
    inputs = random_inputs(model.config, task_ids, seed=11)
    inputs["prompt"]["attention_mask"] = torch.ones(5, model.config.prompt_length, dtype=torch.long)
    inputs["prompt"]["attention_mask"][1, :2] = 0
    inputs["attention_mask"][3, :4] = 0
    expected = _outputs(model, inputs)
    prompt = inputs.pop("prompt")
    with torch.no_grad():
        encoded = model.encode_prompt(prompt, inputs["task_ids"])
        assert encoded.task_ids.tolist() == task_ids and len(encoded.key_values) == model.config.n_layer
        heads, head_dim = model.config.n_head, model.config.hidden_size // model.config.n_head
        assert encoded.key_values[0][0].shape == (5, heads, 3 * model.config.prompt_length, head_dim)
        output = model(**inputs, prompt_key_values=encoded)
    torch.testing.assert_close(output.action_preds, expected, atol=1e-5, rtol=0)
    assert output.last_hidden_state.shape[1] == 3 * model.config.context_length  # the steps' tokens only
    # Rows picked out of the encoding serve a sub-batch; the padded prompt rows really are ignored.
    sub = {k: v[[3, 1]] for k, v in inputs.items()}
    with torch.no_grad():
        picked = model(**sub, prompt_key_values=encoded.select(torch.tensor([3, 1]))).action_preds
    torch.testing.assert_close(picked, expected[[3, 1]], atol=1e-5, rtol=0)
    changed = {k: v.clone() for k, v in prompt.items()}
    changed["states"][1, :2] += 5.0  # padded away in sample 1
    with torch.no_grad():
        again = model(**inputs, prompt_key_values=model.encode_prompt(changed, inputs["task_ids"])).action_preds
    torch.testing.assert_close(again, output.action_preds, atol=1e-6, rtol=0)


def test_encoded_prompt_misuse_is_named(model):
    inputs = random_inputs(model.config, [0, 1], seed=3)
    with torch.no_grad():
        encoded = model.encode_prompt(inputs["prompt"], inputs["task_ids"])
        with pytest.raises(ValueError, match="pass the prompt once"):
            model(**inputs, prompt_key_values=encoded)
        prompt = inputs.pop("prompt")
        with pytest.raises(ValueError, match="encoded for other tasks"):
            model(**inputs, prompt_key_values=encoded.select(torch.tensor([1, 0])))
        with pytest.raises(ValueError, match="prompt_key_values must come from encode_prompt"):
            model(**inputs, prompt_key_values=prompt)
    no_prompt = HarmoDTModel(tiny_config(use_prompt=False)).eval()
    with pytest.raises(ValueError, match="does not use prompts"):
        no_prompt.encode_prompt(prompt, inputs["task_ids"])
    with pytest.raises(ValueError, match="does not use prompts"):
        no_prompt(**inputs, prompt_key_values=encoded)


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_cached_inference_gives_each_sample_its_actions_alone(model, precision):
    """With cached masked weights, a mixed batch holds one masked weight per task, and every sample's actions are
    those of the sample alone (bit-identical where small one-thread matmuls do not depend on the row count)."""
    task_ids = [2, 0, 1, 0, 2, 1]
    inputs = random_inputs(model.config, task_ids, seed=9)
    layer = model.transformer.h[0].mlp.c_fc
    rounding = 1e-6 if small_matmuls_follow_row_count() else 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.cache_masked_weights(True)
    try:
        with torch.autocast("cpu", dtype=precision or torch.float32, enabled=precision is not None):
            mixed = _outputs(model, inputs)
            assert sorted(layer.weight_cache.weights) == [0, 1, 2]
            for i in range(len(task_ids)):
                single = {k: v[i : i + 1] for k, v in inputs.items() if k != "prompt"}
                single["prompt"] = {k: v[i : i + 1] for k, v in inputs["prompt"].items()}
                torch.testing.assert_close(_outputs(model, single), mixed[i : i + 1], atol=rounding, rtol=0)
    finally:
        model.cache_masked_weights(False)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("prompt_as", ["tokens", "encoded"])
def test_state_tokens_only_gives_the_same_predictions_loss_and_gradients(prompt_as):
    """state_tokens_only=True (what the trainer passes): the last block finishes the K state tokens only, and the
    predictions, the loss and every parameter gradient are those of the full forward."""
    torch.manual_seed(0)
    model = HarmoDTModel(tiny_config()).eval()
    inputs = random_inputs(model.config, [2, 0, 1, 0, 2, 1], seed=4)
    if prompt_as == "encoded":
        prompt = inputs.pop("prompt")
        inputs["prompt_key_values"] = model.encode_prompt(prompt, inputs["task_ids"])
    seen = []
    hook = model.transformer.h[-1].mlp.c_fc.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for state_tokens_only in (False, True):
        out = model(**inputs, return_loss=True, state_tokens_only=state_tokens_only)
        grads = torch.autograd.grad(out.loss, params, allow_unused=True, retain_graph=prompt_as == "encoded")
        results.append((out, grads))
    hook.remove()
    k = model.config.context_length
    assert seen[1] == k < seen[0]
    (full, full_grads), (states, state_grads) = results
    assert states.last_hidden_state.shape == (6, k, model.config.hidden_size)
    torch.testing.assert_close(states.action_preds, full.action_preds, atol=1e-6, rtol=0)
    torch.testing.assert_close(states.loss, full.loss)
    for a, b in zip(full_grads, state_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    for extra in (dict(output_hidden_states=True), dict(last_action_only=True)):
        with pytest.raises(ValueError, match="state_tokens_only"):
            model(**inputs, state_tokens_only=True, **extra)


@pytest.mark.parametrize("mask_mode", ["harmony", "none"])
def test_last_action_only_computes_the_last_action_alone(mask_mode, one_torch_thread):
    """last_action_only=True: the last step's action of a full forward (up to float rounding), for an unsorted mixed
    batch with the prompt fed or encoded; the last block finishes two tokens only; on cached weights (the policy's
    path of a masked model) every sample's action is bit-identical to the sample alone; a loss or hidden states are
    refused."""
    torch.manual_seed(0)
    model = HarmoDTModel(tiny_config(mask_mode=mask_mode, use_prompt=mask_mode != "none")).eval()
    task_ids = [2, 0, 1, 0, 2, 1]
    inputs = random_inputs(model.config, task_ids, seed=12)
    seen = []
    hook = model.transformer.h[-1].mlp.c_fc.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    with torch.no_grad():
        full = model(**inputs).action_preds
        last = model(**inputs, last_action_only=True)
    hook.remove()
    assert seen == [3 * model.config.context_length + (3 * model.config.prompt_length if "prompt" in inputs else 0), 2]
    assert last.action_preds.shape == (6, 1, model.config.act_dim)
    assert last.last_hidden_state.shape == (6, 2, model.config.hidden_size)
    torch.testing.assert_close(last.action_preds, full[:, -1:], atol=1e-6, rtol=0)
    if "prompt" in inputs:
        with torch.no_grad():
            encoded = model.encode_prompt(inputs["prompt"], inputs["task_ids"])
            steps = {k: v for k, v in inputs.items() if k != "prompt"}
            cached = model(**steps, prompt_key_values=encoded, last_action_only=True).action_preds
        torch.testing.assert_close(cached, full[:, -1:], atol=1e-5, rtol=0)
    model.cache_masked_weights(True)
    # Without masks every linear is plain, and on some CPUs so are the small embedding linears' last bits: those
    # follow the row count there (see small_matmuls_follow_row_count).
    exact = 1e-6 if mask_mode == "none" or small_matmuls_follow_row_count() else 0.0
    try:
        with torch.no_grad():
            batch = model(**inputs, last_action_only=True).action_preds
            for i in range(len(task_ids)):
                single = {k: v[i : i + 1] for k, v in inputs.items() if k != "prompt"}
                if "prompt" in inputs:
                    single["prompt"] = {k: v[i : i + 1] for k, v in inputs["prompt"].items()}
                alone = model(**single, last_action_only=True).action_preds
                torch.testing.assert_close(alone, batch[i : i + 1], atol=exact, rtol=0)
    finally:
        model.cache_masked_weights(False)
    for extra in (dict(return_loss=True), dict(labels=inputs["actions"]), dict(output_hidden_states=True)):
        with pytest.raises(ValueError, match="last_action_only=True computes the last step's action only"):
            model(**inputs, last_action_only=True, **extra)


def test_gradient_is_zero_where_task_mask_is_off():
    model = HarmoDTModel(tiny_config()).train()
    out = model(**random_inputs(model.config, [1, 1, 1]), return_loss=True)
    out.loss.backward()
    checked = 0
    for name, masks in model.get_task_masks().items():
        grad = model.get_parameter(name).grad
        off = ~masks[1]
        if off.any():
            assert torch.count_nonzero(grad[off]) == 0, name
            assert torch.count_nonzero(grad[masks[1]]) > 0, name
            checked += 1
    assert checked > 0


def test_bfloat16_autocast_forward_and_backward():
    model = HarmoDTModel(tiny_config()).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**random_inputs(model.config, [2, 0, 2]), return_loss=True)
    out.loss.backward()
    assert out.action_preds.dtype == torch.bfloat16
    for name, masks in model.get_task_masks().items():
        grad = model.get_parameter(name).grad
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
        assert torch.count_nonzero(grad[~(masks[0] | masks[2])]) == 0, name


def test_task_grad_sink_holds_each_tasks_effective_weight_gradient():
    """One grouped pass sets, per task in the batch, dL_t/d(W ⊙ M_t): equal to the ordinary gradient on the task's
    active weights, and a real (non-zero) signal on its inactive ones; other tasks' rows keep what they held."""
    model = HarmoDTModel(tiny_config()).train()
    inputs = random_inputs(model.config, [0, 0, 1, 1], seed=3)
    layers = model.masked_layers()
    for layer in layers.values():
        layer.task_grad_sink = torch.full((3, *layer.weight.shape), 7.0)  # rows 0 and 1 must be overwritten
    preds = model(**inputs).action_preds
    loss = ((preds[:2] - inputs["actions"][:2]) ** 2).mean() + ((preds[2:] - inputs["actions"][2:]) ** 2).mean()
    torch.autograd.grad(loss, [layer.weight for layer in layers.values()], allow_unused=True)
    sinks = {name: layer.task_grad_sink for name, layer in layers.items()}
    for layer in layers.values():
        layer.task_grad_sink = None
    for task, rows in ((0, slice(0, 2)), (1, slice(2, 4))):
        alone = {k: v[rows] for k, v in inputs.items() if k != "prompt"}
        alone["prompt"] = {k: v[rows] for k, v in inputs["prompt"].items()}
        model.zero_grad()
        ((model(**alone).action_preds - alone["actions"]) ** 2).mean().backward()
        for name, layer in layers.items():
            active = layer.task_masks()[task]
            torch.testing.assert_close(sinks[name][task][active], layer.weight.grad[active], atol=1e-6, rtol=1e-4)
            if (~active).any():  # ERK leaves the smallest layers dense
                assert sinks[name][task][~active].abs().sum() > 0, name
        assert all(bool((s[2] == 7.0).all()) for s in sinks.values())  # task 2 had no samples: untouched


def _set_group_matmul(model: HarmoDTModel, mode: str) -> None:
    for layer in model.masked_layers().values():
        layer.group_matmul = mode


def test_batched_group_matmul_equals_the_loop(monkeypatch):
    """The accelerator path (one batched matmul over equal task groups) gives the loop's outputs, weight, bias and
    input gradients, per-task sink gradients and cached inference outputs."""
    from harmodt_hf.model import masked_linear

    decisions = []
    choose = masked_linear.use_batched_groups
    monkeypatch.setattr(masked_linear, "use_batched_groups", lambda *a: decisions.append(choose(*a)) or decisions[-1])
    torch.manual_seed(0)
    model = HarmoDTModel(tiny_config()).train()
    inputs = random_inputs(model.config, [0, 0, 1, 1, 2, 2], seed=5)
    results = {}
    for mode in ("loop", "batched"):
        _set_group_matmul(model, mode)
        model.zero_grad()
        out = model(**inputs, return_loss=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        layers = model.masked_layers()
        for layer in layers.values():
            layer.task_grad_sink = torch.zeros(3, *layer.weight.shape)
        loss = model(**inputs, return_loss=True).loss
        torch.autograd.grad(loss, [layer.weight for layer in layers.values()], allow_unused=True)
        sinks = {name: layer.task_grad_sink for name, layer in layers.items()}
        for layer in layers.values():
            layer.task_grad_sink = None
        model.eval().cache_masked_weights(True)
        cached = _outputs(model, inputs)
        model.cache_masked_weights(False)
        model.train()
        results[mode] = (out.action_preds.detach(), grads, sinks, cached)
        assert decisions and all(d == (mode == "batched") for d in decisions)  # the path under test was taken
        decisions.clear()
    _set_group_matmul(model, "auto")
    (preds, grads, sinks, cached), (preds_b, grads_b, sinks_b, cached_b) = results["loop"], results["batched"]
    torch.testing.assert_close(preds_b, preds, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cached_b, cached, atol=1e-6, rtol=1e-5)
    assert grads_b.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_b[name], grads[name], atol=1e-6, rtol=1e-4)
    for name in sinks:
        torch.testing.assert_close(sinks_b[name], sinks[name], atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="group_matmul"):
        _set_group_matmul(model, "bmm")
        model(**inputs)
    _set_group_matmul(model, "auto")


def test_loss_is_masked_mse(model):
    inputs = random_inputs(model.config, [0, 1])
    out = model(**inputs, return_loss=True)
    valid = inputs["attention_mask"].bool()
    expected = ((out.action_preds - inputs["actions"]) ** 2)[valid].mean()
    torch.testing.assert_close(out.loss, expected)
    labels = torch.zeros_like(inputs["actions"])
    out2 = model(**inputs, labels=labels)
    torch.testing.assert_close(out2.loss, (out2.action_preds[valid] ** 2).mean())
    assert model(**inputs).loss is None
    assert out.action_preds.abs().max() <= 1


def test_trains_under_trainer_loss_contract(model):
    """``loss`` comes first so ``Trainer`` can use the model without a wrapper."""
    out = model(**random_inputs(model.config, [0]), return_loss=True)
    assert out[0] is out.loss and list(out.keys())[0] == "loss"


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda x: x.update(states=x["states"][..., :10]), "states must be"),
        (lambda x: x.update(actions=x["actions"][..., :3]), "actions must be"),
        (lambda x: x.update(task_ids=torch.tensor([0, 3])), "task_ids must be in"),
        (lambda x: x.update(task_ids=torch.tensor([0, -1])), "task_ids must be in"),
        (lambda x: x.update(actions=x["actions"][:, :-1]), "actions has batch/steps"),
        (lambda x: x.update(returns_to_go=x["returns_to_go"][:, :-1]), "returns_to_go has batch/steps"),
        (lambda x: x.update(timesteps=x["timesteps"][:, :-1]), "timesteps has batch/steps"),
        (lambda x: x.update(attention_mask=x["attention_mask"][:, :-1]), "attention_mask has batch/steps"),
        (lambda x: x.update(timesteps=x["timesteps"] + 1000), "max_ep_len"),
        (lambda x: x["states"].__setitem__((0, 0, 0), math.nan), "states contains NaN"),
        (lambda x: x["returns_to_go"].__setitem__((1, 0, 0), math.nan), "returns_to_go contains NaN"),
        (lambda x: x["prompt"]["actions"].__setitem__((0, 0, 0), math.inf), "prompt actions contains NaN"),
        (lambda x: x.pop("task_ids"), "task_ids is required"),
        (lambda x: x.pop("prompt"), "prompt="),
    ],
)
def test_bad_input_is_named(model, edit, message):
    inputs = random_inputs(model.config, [0, 1])
    edit(inputs)
    with pytest.raises(ValueError, match=message):
        model(**inputs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(hidden_size=-4), "hidden_size"),
        (dict(n_layer=0), "n_layer"),
        (dict(hidden_size=30, n_head=4), "n_head"),
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=-0.1), "sparsity"),
        (dict(mask_mode="magic"), "mask_mode"),
        (dict(target_returns=[1.0]), "target_returns"),
        (dict(state_mean=[[0.0] * 39]), "state_mean"),
        (dict(state_std=[[1.0] * 5] * 3), "state_std"),
        (dict(task_names=["a", "a"]), "task_names"),
        (dict(resid_pdrop=1.5), "resid_pdrop"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**kwargs)


@pytest.mark.parametrize("mask_mode", ["harmony", "none"])
@pytest.mark.parametrize("prompt_as", ["tokens", "encoded"])
def test_forward_needs_no_device_synchronisation(mask_mode, prompt_as):
    """The input checks read no values off the device: the whole forward runs on the meta device (where reading a
    value raises), with the task ids given on the CPU (a masked model reads them on the host to group the batch)."""
    model = HarmoDTModel(tiny_config(mask_mode=mask_mode)).eval()
    inputs = random_inputs(model.config, [2, 0, 1, 0])
    prompt = inputs.pop("prompt")
    task_ids = inputs.pop("task_ids")
    with torch.no_grad():
        if prompt_as == "encoded":
            prompt = {"prompt_key_values": model.encode_prompt(prompt, task_ids)}
        else:
            prompt = {"prompt": prompt}
        model.to("meta")
        meta = {k: v.to("meta") for k, v in inputs.items()}
        if prompt_as == "encoded":
            encoded = prompt["prompt_key_values"]
            kv = tuple((k.to("meta"), v.to("meta")) for k, v in encoded.key_values)
            prompt["prompt_key_values"] = type(encoded)(
                kv, encoded.attention_mask.to("meta"), encoded.task_ids.to("meta")
            )
        else:
            prompt["prompt"] = {k: v.to("meta") for k, v in prompt["prompt"].items()}
        output = model(**meta, **prompt, task_ids=task_ids, last_action_only=prompt_as == "encoded")
    assert output.action_preds.device.type == "meta"
    assert output.action_preds.shape[0] == 4
