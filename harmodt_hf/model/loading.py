"""What :meth:`HarmoDTModel.from_pretrained <.modeling_harmodt.HarmoDTModel.from_pretrained>` refuses, each refusal
naming the file and the fix: a source without ``config.json`` (transformers would build a default configuration), a
``config.json`` whose task order, task count or ``mask_mode`` contradicts the saved weights, and non-finite weights.

The saved task order is known from the ``task_name_crc32`` buffer (one CRC-32 per task name, saved with the weights).
Checkpoints saved before it existed lack it: they load as before, without the order check.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence

import torch
from transformers import PretrainedConfig
from transformers.utils import CONFIG_NAME, cached_file

HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def task_name_crc32(task_names: Sequence[str]) -> torch.Tensor:
    """``(num_tasks,)`` int64: the CRC-32 of every task name, in order."""
    return torch.tensor([zlib.crc32(name.encode()) for name in task_names], dtype=torch.int64)


def check_pretrained_source(path, kwargs: dict) -> str:
    """The weights' location for messages; refuse a source without ``config.json`` when no config object is given."""
    if path is None:
        return "the state_dict given to from_pretrained"
    subfolder = kwargs.get("subfolder") or ""
    where = os.path.join(str(path), subfolder) if subfolder else str(path)
    config = kwargs.get("config")
    if not isinstance(config, PretrainedConfig):
        config_source = path if config is None else config
        hub = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        found = cached_file(
            config_source,
            CONFIG_NAME,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub,
        )
        if found is None:
            raise ValueError(
                f"{config_source} has no {CONFIG_NAME}: without it transformers would build a default HarmoDTConfig "
                "(one task 'task-0', state mean 0 / std 1, paper-size layers) and load the weights into it. Save the "
                f"model with save_pretrained, which writes {CONFIG_NAME}, or pass config= (a HarmoDTConfig, or the "
                "folder the model was saved to)."
            )
    return f"{where}/model.safetensors"


def check_loaded_model(model: torch.nn.Module, info: dict, source: str) -> None:
    """Refuse a loaded model whose checkpoint contradicts its config; ``info`` is ``from_pretrained``'s loading info.

    A checkpoint without any tensor loads as a new model (masks drawn from ``config.mask_seed``, every key reported
    missing by transformers); one that holds weights but no masks is refused, rather than drawing masks at random.
    """
    config = model.config
    state = model.state_dict()
    missing = set(info.get("missing_keys", ()))
    mismatched = {key[0] if isinstance(key, tuple) else key for key in info.get("mismatched_keys", ())}
    unexpected = set(info.get("unexpected_keys", ()))
    saved_masks = sorted(key for key in unexpected if key.endswith("packed_masks"))
    if saved_masks:
        raise ValueError(
            f"{source} holds task masks ({saved_masks[0]}, ...) but config.json says mask_mode='none': they would be "
            "dropped. Set mask_mode in config.json to the mode the model was trained with ('harmony' or 'random')."
        )
    if not set(state) - missing - {"task_name_crc32"} and not unexpected:
        return  # no tensor at all: a new model
    absent_masks = sorted(key for key in state if key.endswith("packed_masks") and key in missing | mismatched)
    if absent_masks:
        raise ValueError(
            f"{source} has no usable task masks for {len(absent_masks)} masked layer(s) (e.g. {absent_masks[0]}), but "
            f"config.json says mask_mode={config.mask_mode!r}: it was saved with mask_mode='none' or another task "
            "count. Load it with the config.json it was saved with; refusing to draw the masks at random."
        )
    check_task_order(model.task_name_crc32, config.task_names, source)
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"{source}: {name} holds NaN or infinite values, so the model's actions would not be finite (a run "
                "that diverged, or a damaged file). Load an earlier checkpoint of the run, or fix the weights and save "
                "them again."
            )


def check_task_order(saved: torch.Tensor, task_names: Sequence[str], source: str) -> None:
    """Refuse ``task_names`` (config.json's) that are not, in order, the tasks the masks and prompts were saved for."""
    expected = task_name_crc32(task_names)
    saved = saved.cpu()
    if torch.equal(saved, expected):
        return
    if sorted(saved.tolist()) == sorted(expected.tolist()):
        names = dict(zip(expected.tolist(), task_names, strict=True))
        order = [names[crc] for crc in saved.tolist()]
        raise ValueError(
            f"config.json lists task_names in another order than {source} was saved with: saved {order}, config.json "
            f"{list(task_names)}. Each task's masks and prompt would be attached to another task's name. Restore "
            "task_names in config.json to the saved order (with the rows of state_mean, state_std and target_returns)."
        )
    raise ValueError(
        f"config.json's task_names {list(task_names)} are not the tasks {source} was saved for (their checksums "
        "differ). Load it with the config.json it was saved with."
    )
