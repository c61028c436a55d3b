"""The token layout of the paper, (R, s, a) per step after the prompt's: timesteps and left padding."""

from __future__ import annotations

import pytest
import torch
from helpers import random_inputs, tiny_config

from harmodt_hf import HarmoDTModel


@pytest.fixture(scope="module")
def model() -> HarmoDTModel:
    torch.manual_seed(0)
    return HarmoDTModel(tiny_config()).eval()


def _actions(model, inputs):
    with torch.no_grad():
        return model(**inputs).action_preds


def test_left_padding_does_not_change_real_steps(model):
    inputs = random_inputs(model.config, [1], seed=2)
    inputs["attention_mask"][:] = 1
    padded = {k: v for k, v in inputs.items()}
    for key in ("states", "actions", "returns_to_go", "timesteps", "attention_mask"):
        t = inputs[key]
        padded[key] = torch.cat([torch.zeros_like(t[:, :2]), t], dim=1)
    torch.testing.assert_close(_actions(model, padded)[:, 2:], _actions(model, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("part", ["steps", "prompt"])
def test_a_steps_timestep_reaches_its_return_state_and_action_tokens(model, part):
    """The token layout of the paper: each step's (R, s, a) tokens carry that step's timestep embedding, and only
    theirs (the first block's input, before any mixing across tokens; also for the prompt's tokens)."""
    inputs = random_inputs(model.config, [0, 1], seed=3)
    shifted = {**inputs, "prompt": dict(inputs["prompt"])}
    step = 1
    if part == "steps":
        shifted["timesteps"] = inputs["timesteps"].clone()
        shifted["timesteps"][:, step] += 1
    else:
        shifted["prompt"]["timesteps"] = inputs["prompt"]["timesteps"].clone()
        shifted["prompt"]["timesteps"][:, step] += 1
    with torch.no_grad():
        before, after = (model(**x, output_hidden_states=True).hidden_states[0] for x in (inputs, shifted))
    prompt_tokens = 3 * model.config.prompt_length
    span = slice(prompt_tokens, None) if part == "steps" else slice(0, prompt_tokens)
    before, after = (h[:, span].reshape(2, -1, 3, model.config.hidden_size) for h in (before, after))
    changed = (before != after).any(dim=-1)  # (batch, step, token): return, state, action
    expected = torch.zeros_like(changed)
    expected[:, step] = True
    assert torch.equal(changed, expected), changed
