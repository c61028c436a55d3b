"""Compile each MuJoCo model file once per process and give every new environment its own copy.

Building a Meta-World environment is almost entirely ``mujoco.MjModel.from_xml_path``, ten times the cost of copying
a compiled model (``benchmarks/RESULTS.md``), and an evaluation builds one environment per episode, so
:func:`make_env <harmodt_hf.envs.make_env>` builds them inside :func:`reuse_compiled_models`. Every environment
still gets its own ``MjModel`` (Meta-World changes model fields such as body positions on reset), copied from a
pristine one that no environment holds, so the simulation is the same as after a fresh compile.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import threading
from collections.abc import Iterator

import mujoco

_LOCK = threading.RLock()
_COMPILED: dict[tuple[str, float], mujoco.MjModel] = {}  # (real path, mtime) -> a compiled model no env holds


def _load_copy(original, path, *args, **kwargs) -> mujoco.MjModel:
    """A copy of the compiled model of ``path`` (compiled on first use); calls with assets or a VFS compile anew."""
    if args or kwargs:
        return original(path, *args, **kwargs)
    real = os.path.realpath(os.fspath(path))
    key = (real, os.path.getmtime(real))
    if key not in _COMPILED:
        _COMPILED[key] = original(path)
    return copy.deepcopy(_COMPILED[key])


@contextlib.contextmanager
def reuse_compiled_models() -> Iterator[None]:
    """Within this block (one thread at a time), ``mujoco.MjModel.from_xml_path(path)`` returns a copy of ``path``'s
    model compiled once per process. A file changed on disk (new mtime) is compiled again."""
    with _LOCK:
        if getattr(mujoco.MjModel.from_xml_path, "_harmodt_reuse", False):  # re-entered: already in place
            yield
            return
        stored = inspect.getattr_static(mujoco.MjModel, "from_xml_path")  # put back as it was (a staticmethod)
        compile_file = mujoco.MjModel.from_xml_path

        def from_xml_path(path, *args, **kwargs):
            return _load_copy(compile_file, path, *args, **kwargs)

        from_xml_path._harmodt_reuse = True
        mujoco.MjModel.from_xml_path = staticmethod(from_xml_path)
        try:
            yield
        finally:
            mujoco.MjModel.from_xml_path = stored


def clear_compiled_models() -> None:
    """Forget the compiled models of this process (they are kept until then: ~7 MB per task, mostly textures)."""
    with _LOCK:
        _COMPILED.clear()
