"""Keep freed memory in the process for reuse (glibc malloc), so CPU tensors do not page-fault afresh.

A task-grouped CPU training step or mask update allocates and frees many buffers of 0.1 to 30 MiB per layer (each
task group's output rows, masked weights, casts). With glibc's defaults freed memory at the top of the heap is given
back to the system once it exceeds a threshold that follows the largest recent allocation, so the next round of
buffers costs a page fault per 4 KiB again: a quarter of a 400-sample training step here (``benchmarks/RESULTS.md``).
:func:`keep_freed_memory` fixes the thresholds instead: allocations below ``mmap_threshold`` come from the heap and
up to ``keep_bytes`` of freed heap memory stay in the process for the next buffers. Peak memory is unchanged; the
process gives freed memory back later. Tensors above ``mmap_threshold`` (at most 32 MiB in glibc) still get fresh
pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_applied = False


def keep_freed_memory(mmap_threshold: int = 32 << 20, keep_bytes: int = (1 << 31) - 1) -> bool:
    """Serve allocations below ``mmap_threshold`` bytes from the heap and keep up to ``keep_bytes`` of freed heap
    memory (glibc ``mallopt``). Process-wide and lasting; a no-op returning ``False`` where the C library is not glibc
    (macOS, musl, Windows). Returns whether the setting is in force."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the trim threshold first, so that nothing is returned to the system in between.
    _applied = bool(mallopt(_M_TRIM_THRESHOLD, keep_bytes)) and bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
    if not _applied:
        logger.info("glibc mallopt refused the allocator thresholds; large tensors keep page-faulting afresh")
    return _applied
