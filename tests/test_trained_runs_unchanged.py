"""Behaviour unchanged: short training runs of every mask rule give the recorded masks and trained weights.

The record (tests/golden/trained_runs.json) was made at the commit the training renovation (issue #16) started from:
after each of three mask updates the mask hash, and at the end a digest of every tensor of the trained model. See
tests/golden/trained_runs.py for what each run covers and how to regenerate on purpose.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from golden.trained_runs import LOSS_RTOL, RECORD_FILE, RUNS, SUM_RTOL, platform, run
from transformers.utils import logging

logging.disable_progress_bar()
RECORD = json.loads(RECORD_FILE.read_text())
REGENERATE = "if the change is intended, run `PYTHONPATH=$PWD python tests/golden/trained_runs.py` and say why"


@pytest.mark.parametrize("name", list(RUNS))
def test_training_run_gives_the_recorded_masks_and_weights(name, tmp_path):
    got, expected = run(name, tmp_path), RECORD["runs"][name]
    assert got["mask_steps"] == expected["mask_steps"] == [3, 6, 9]
    assert got["mask_k"] == expected["mask_k"], REGENERATE
    assert got["mask_hashes"] == expected["mask_hashes"], REGENERATE
    if platform() == RECORD["platform"]:  # the recording platform: bit for bit
        assert got["losses"] == expected["losses"], REGENERATE
        assert got["weights_sha256"] == expected["weights_sha256"], REGENERATE
    else:  # other kernels may round differently
        np.testing.assert_allclose(got["losses"], expected["losses"], rtol=LOSS_RTOL, err_msg=REGENERATE)
    assert got["weight_sums"].keys() == expected["weight_sums"].keys()
    for key, value in expected["weight_sums"].items():
        assert got["weight_sums"][key] == pytest.approx(value, rel=SUM_RTOL, abs=1e-6), (key, REGENERATE)
