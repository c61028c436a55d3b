"""CPU feature probes and the warning for emulated bf16."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tiny_config

from harmodt_hf import HarmoDTModel, cpu_features
from harmodt_hf.evaluation.policy import HarmoDTPolicy


def test_probes_answer_booleans_and_a_missing_probe_is_false(monkeypatch):
    assert isinstance(cpu_features.has_amx(), bool) and isinstance(cpu_features.has_native_bf16(), bool)
    assert cpu_features.has_native_bf16() or not cpu_features.has_amx()  # AMX implies native bf16
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert cpu_features._probe("_is_amx_tile_supported") is False


@pytest.mark.parametrize("native", [True, False])
def test_bf16_policy_warns_only_where_bf16_is_emulated(monkeypatch, native):
    monkeypatch.setattr(cpu_features, "has_native_bf16", lambda: native)
    model = HarmoDTModel(tiny_config()).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        HarmoDTPolicy(model, precision="bf16")
        HarmoDTPolicy(model, precision="fp32")
    messages = [str(w.message) for w in caught if "without native bf16" in str(w.message)]
    assert len(messages) == (0 if native else 1)
    assert native or 'precision="fp32"' in messages[0]
    assert not cpu_features.warn_if_bf16_is_emulated(torch.device("meta"), "x", "y")  # other devices: never
