"""Training configs shipped with the package (YAML, read by ``harmodt-train --config``).

``tiny.yaml`` (the main job's CPU model), ``paper.yaml`` (the paper's hyper-parameters) and
``paper/<variant>_<set>-<quality>.yaml`` (every variant, task set and data quality; they extend ``paper.yaml``).
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent

__all__ = ["CONFIG_DIR", "available_configs", "config_path"]


def available_configs() -> list[str]:
    """Names of the shipped configs, such as ``"tiny"`` or ``"paper/harmodt-f_mt10-near-optimal"``."""
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.yaml"))


def config_path(name: str) -> Path:
    """The file of a shipped config by name (``"tiny"``, ``"paper/harmodt-f_mt10-near-optimal"``; ``.yaml`` optional).

    Raises ``FileNotFoundError`` listing the shipped names when there is no such config.
    """
    relative = name if name.endswith(".yaml") else f"{name}.yaml"
    path = (CONFIG_DIR / relative).resolve()
    if not path.is_relative_to(CONFIG_DIR) or not path.is_file():
        raise FileNotFoundError(f"No shipped config named {name!r}. Shipped configs: {', '.join(available_configs())}.")
    return path
