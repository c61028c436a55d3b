"""Golden outputs: a tiny fixed-seed model's actions and a few training steps, compared with tests/golden/golden.json.

The other model tests compare code paths with each other, so a change that every path shares (an embedding term left
out, a normalisation, the loss, the mask selection's numerics) passes them; these numbers catch it. When the
arithmetic is *meant* to change, regenerate on purpose: ``PYTHONPATH=$PWD python tests/golden/regenerate.py`` (see
its docstring) and say why in the commit message.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from golden.regenerate import (
    ACTION_ATOL,
    GOLDEN_FILE,
    LOSS_RTOL,
    TRAINING_RUNS,
    golden_inputs,
    golden_model,
    golden_training,
)
from transformers.utils import logging

logging.disable_progress_bar()
GOLDEN = json.loads(GOLDEN_FILE.read_text())
REGENERATE = "if the change is intended, run `PYTHONPATH=$PWD python tests/golden/regenerate.py` and say why"


def _actions(path: str) -> np.ndarray:
    """The golden inputs' actions through one forward path of the golden model."""
    model = golden_model()
    inputs = golden_inputs(model.config)
    if path == "train-mode-with-grad":  # the training path (dropout is 0 in the tiny config)
        return model.train()(**inputs).action_preds.detach().numpy()
    with torch.no_grad():
        if path == "cached-weights":
            with model.masked_weights_cached():
                return model(**inputs).action_preds.numpy()
        if path == "last-action-only":
            return model(**inputs, last_action_only=True).action_preds.numpy()
        return model(**inputs).action_preds.numpy()


@pytest.mark.parametrize("path", ["eval", "train-mode-with-grad", "cached-weights", "last-action-only"])
def test_tiny_model_actions_match_the_goldens(path):
    """Every forward path gives the stored actions within ACTION_ATOL (kernels may round differently)."""
    expected = np.array(GOLDEN["actions"], dtype=np.float32)
    if path == "last-action-only":
        expected = expected[:, -1:]
    np.testing.assert_allclose(_actions(path), expected, rtol=0, atol=ACTION_ATOL, err_msg=REGENERATE)


@pytest.mark.parametrize("rule", list(TRAINING_RUNS))
def test_a_few_training_steps_match_the_goldens(rule, tmp_path):
    """Losses within LOSS_RTOL; mask update steps, prune counts and mask hashes exactly."""
    got, expected = golden_training(rule, tmp_path), GOLDEN["training"][rule]
    message = REGENERATE
    if rule == "reference":
        message += (
            f"; the reference rule's regrow is tie-breaking, so its masks also follow torch.topk's tie order "
            f"(goldens made with torch {GOLDEN['_generated_with']['torch']}, this is {torch.__version__})"
        )
    assert got["mask_steps"] == expected["mask_steps"] and len(got["mask_steps"]) == 2  # two mask updates ran
    assert got["mask_k"] == expected["mask_k"] and min(got["mask_k"]) > 0, message
    np.testing.assert_allclose(got["losses"], expected["losses"], rtol=LOSS_RTOL, err_msg=message)
    np.testing.assert_allclose(got["mask_losses"], expected["mask_losses"], rtol=LOSS_RTOL, err_msg=message)
    assert got["mask_hashes"] == expected["mask_hashes"], message
