"""What a HarmoDT checkpoint carries beyond ``Trainer``'s own files, and the checks made when a run resumes from it.

Each ``checkpoint-N`` folder gets ``harmodt_run.json``: the run's setup (task names in order, variant, mask mode, model
size, mask seed and sparsity, the mask rule), the hash of the task masks saved beside it, and the mask history so far.
On resume the new run's setup must equal the checkpoint's (a reordered task list would give each task another task's
mask and prompt; another variant would drop or invent masks), the checkpoint must hold the task masks the model has,
and the masks loaded must have the recorded hash. Every refusal names both values and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

RUN_FILE = "harmodt_run.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_SIZE_KEYS = (
    "state_dim", "act_dim", "hidden_size", "n_layer", "n_head", "n_inner", "context_length", "prompt_length",
    "max_ep_len",
)  # fmt: skip


def run_setup(config, update_rule: str, score: str) -> dict[str, Any]:
    """What identifies a run's setup: a resumed run must have the same (JSON-serialisable values)."""
    setup: dict[str, Any] = {
        "task_names": list(config.task_names),
        "variant": getattr(config, "variant", None),
        "mask_mode": config.mask_mode,
        "use_prompt": config.use_prompt,
        **{key: getattr(config, key) for key in MODEL_SIZE_KEYS},
    }
    if config.has_masks:
        setup.update(sparsity=config.sparsity, mask_seed=config.mask_seed)
    if config.mask_mode == "harmony":
        setup.update(update_rule=update_rule, score=score)
    return setup


def write_run_file(folder: str | Path, setup: dict, mask_hash: str, mask_history: list[dict]) -> None:
    """Write ``harmodt_run.json`` into a checkpoint folder."""
    payload = {"setup": setup, "mask_hash": mask_hash, "mask_history": mask_history}
    (Path(folder) / RUN_FILE).write_text(json.dumps(payload, indent=1))


def read_run_file(folder: str | Path) -> dict | None:
    """The checkpoint's ``harmodt_run.json``, or ``None`` for a checkpoint written without one."""
    path = Path(folder) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_same_setup(folder: str | Path, saved: dict, current: dict) -> None:
    """Refuse to resume from ``folder`` when the new run's setup differs from the checkpoint's."""
    differences = [
        f"{key}: the checkpoint has {saved.get(key)!r}, this run {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if differences:
        raise ValueError(
            f"Cannot resume from {folder}: this run's setup differs from the checkpoint's\n  "
            + "\n  ".join(differences)
            + "\nResume with the checkpoint's settings (its task list in the same order, its variant, model size and "
            "mask rule), or start a new run in another --output_dir."
        )


def check_masks_present(folder: str | Path, mask_keys: list[str]) -> None:
    """Refuse a checkpoint whose weights lack task masks the model has (resuming would train on fresh masks)."""
    path = Path(folder) / WEIGHTS_FILE
    if not mask_keys or not path.is_file():
        return
    with safe_open(str(path), framework="pt") as weights:
        stored = set(weights.keys())
    missing = [key for key in mask_keys if key not in stored]
    if missing:
        raise ValueError(
            f"Cannot resume from {folder}: {path.name} lacks the task masks {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''} ({len(missing)} of {len(mask_keys)}); resuming would train on "
            "freshly drawn masks (from_pretrained refuses this folder too). Resume from a checkpoint that holds its "
            "masks."
        )


def check_mask_hash(folder: str | Path, recorded: str, loaded: str) -> None:
    """Refuse masks that are not the ones the checkpoint recorded (edited or damaged files)."""
    if recorded != loaded:
        raise ValueError(
            f"Cannot resume from {folder}: the task masks loaded from it have hash {loaded[:16]}…, the checkpoint "
            f"recorded {recorded[:16]}… when it was saved; its {WEIGHTS_FILE} was changed since. Resume from an "
            "intact checkpoint."
        )
