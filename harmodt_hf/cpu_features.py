"""What this CPU computes fast (native bf16, AMX), read from PyTorch's own CPU feature probes: bf16 autocast is
an order of magnitude slower where it is emulated (``benchmarks/RESULTS.md``, sixth session)."""

from __future__ import annotations

import functools
import warnings

import torch

__all__ = ["has_amx", "has_native_bf16", "warn_if_bf16_is_emulated"]


def _probe(name: str) -> bool:
    """``torch.cpu.<name>()`` (a private probe of PyTorch's, present since 2.3), ``False`` where it is missing."""
    probe = getattr(torch.cpu, name, None)
    if probe is None:
        return False
    try:
        return bool(probe())
    except RuntimeError:
        return False


@functools.cache
def has_amx() -> bool:
    """Whether the CPU has AMX tiles (fast bf16 and int8 matmuls)."""
    return _probe("_is_amx_tile_supported")


@functools.cache
def has_native_bf16() -> bool:
    """Whether bf16 arithmetic runs natively (AVX512-BF16 or AMX) rather than emulated through float32."""
    return has_amx() or _probe("_is_avx512_bf16_supported")


def warn_if_bf16_is_emulated(device: torch.device, what: str, fix: str) -> bool:
    """Warn (``UserWarning``) that ``what`` will run bf16 autocast emulated on a CPU without native bf16, naming
    ``fix``; returns whether it warned. Nothing happens on other devices or CPUs with AVX512-BF16/AMX."""
    if torch.device(device).type != "cpu" or has_native_bf16():
        return False
    warnings.warn(
        f"{what} runs under bf16 autocast on a CPU without native bf16 (no AVX512-BF16 or AMX), where PyTorch "
        f"emulates it: about 10x slower than float32 (a mask update's gradient pass took 311 s against 30 s on an "
        f"AVX2 EPYC). {fix}",
        UserWarning,
        stacklevel=3,
    )
    return True
