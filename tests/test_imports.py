"""What importing the package costs: task names, data, cards and training come without the simulator (#16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WITHOUT_SIMULATOR = ("harmodt_hf", "harmodt_hf.tasks", "harmodt_hf.data", "harmodt_hf.hub.cards", "harmodt_hf.training")


def _modules_after_import(names: tuple[str, ...]) -> set[str]:
    """The modules a fresh interpreter holds after importing ``names`` (from this checkout)."""
    code = (
        "import json, sys\n" + "".join(f"import {name}\n" for name in names) + "print(json.dumps(sorted(sys.modules)))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return set(json.loads(result.stdout))


def test_package_task_names_data_cards_and_training_do_not_import_mujoco():
    modules = _modules_after_import(WITHOUT_SIMULATOR)
    assert set(WITHOUT_SIMULATOR) <= modules
    simulator = sorted(m for m in modules if m.split(".")[0] in ("mujoco", "metaworld") or m == "harmodt_hf.envs")
    assert not simulator, simulator
    # the check sees MuJoCo when it is there: the environments import it
    assert "mujoco" in _modules_after_import(("harmodt_hf.envs",))
