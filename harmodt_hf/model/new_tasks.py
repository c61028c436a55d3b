"""Tasks a trained model never saw: :func:`add_task` grows a model by one task (``HarmoDTModel.add_task``).

HarmoDT's answer for an unseen task is a **merged mask** — keep a weight where at least ``merge_threshold`` of the
trained tasks' masks keep it (the official default: half of them) — and a prompt from a few demonstrations of the new
task (Prompt-DT's few-shot mechanism). Adding a task appends one entry to everything that is per task:

* the config: ``task_names``, ``state_mean``, ``state_std``, ``target_returns``, and ``added_tasks`` (a record of the
  tasks added after training: ``{name: {"mask": ..., "merge_threshold": ...}}``; merged masks are computed over the
  *trained* tasks only, so a second added task does not vote);
* every masked layer's packed mask buffer (one row: the merged mask, all ones, or a copy of a trained task's mask);
* the stored prompt buffers (one row: the new task's prompt, model-ready);
* the ``task_name_crc32`` buffer that ``from_pretrained`` checks the task order with.

The grown model saves and loads like any other (``save_pretrained`` → ``from_pretrained``, also through ``AutoModel``
with ``trust_remote_code=True``). The trained tasks' rows are not touched, so their actions stay the same bit for bit.
The prompt and statistics usually come from demonstrations
(:func:`harmodt_hf.training.demonstrations.demonstrations_from_dataset`, the training rule for prompts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from .inputs import PROMPT_KEYS, check_prompt
from .loading import task_name_crc32
from .masked_linear import MaskedLinear
from .masks import merged_mask

NEW_TASK_MASKS = ("merged", "ones")  # or the name of a trained task, whose mask is copied


def added_tasks(config) -> dict[str, dict]:
    """The tasks added after training (``config.added_tasks``; empty for a model as trained)."""
    return dict(getattr(config, "added_tasks", None) or {})


def trained_task_ids(config) -> list[int]:
    """Ids of the tasks the model was trained on: every task but those of :func:`added_tasks`."""
    added = added_tasks(config)
    return [index for index, name in enumerate(config.task_names) if name not in added]


def default_merge_threshold(num_trained_tasks: int) -> int:
    """At least half of the trained tasks: ``ceil(T / 2)`` (25 of 50, as the official ``merge_thres``)."""
    return (num_trained_tasks + 1) // 2


def new_task_masks(model: PreTrainedModel, mask: str, merge_threshold: int | None = None) -> dict[str, torch.Tensor]:
    """The masks a new task gets, ``{parameter name: bool (out, in)}``: ``"merged"`` (weights kept by at least
    ``merge_threshold`` trained tasks; default half of them), ``"ones"`` (every weight) or a trained task's name (a
    copy of its mask). Raises ``ValueError`` naming the fix for anything else."""
    config = model.config
    if not config.has_masks:
        raise ValueError(f"This model has no task masks (mask_mode='none'): add the task without mask=, got {mask!r}")
    trained = trained_task_ids(config)
    masks = model.get_task_masks()
    if mask != "merged" and merge_threshold is not None:
        raise ValueError(f"merge_threshold is for mask='merged' only, got mask={mask!r}: drop merge_threshold")
    if mask == "merged":
        threshold = default_merge_threshold(len(trained)) if merge_threshold is None else merge_threshold
        if not isinstance(threshold, (int, np.integer)) or isinstance(threshold, bool):
            raise ValueError(f"merge_threshold must be an integer, got {threshold!r}")
        if not 1 <= threshold <= len(trained):
            raise ValueError(
                f"merge_threshold must be in 1..{len(trained)} (the number of trained tasks: a weight is kept where at "
                f"least this many of their masks keep it), got {threshold}"
            )
        index = torch.tensor(trained, device=next(iter(masks.values())).device)
        return merged_mask({name: m.index_select(0, index) for name, m in masks.items()}, int(threshold))
    if mask == "ones":
        return {name: torch.ones_like(m[0]) for name, m in masks.items()}
    if mask in config.task_names:
        task = config.task_names.index(mask)
        return {name: m[task].clone() for name, m in masks.items()}
    raise ValueError(
        f"mask must be one of {NEW_TASK_MASKS} or the name of one of the model's tasks {config.task_names}, "
        f"got {mask!r}"
    )


def _vector(values, length: int, what: str) -> list[float]:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.shape != (length,):
        raise ValueError(f"{what} must hold state_dim={length} values, got shape {np.shape(values)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return array.tolist()


def check_new_task_prompt(config, prompt: Mapping) -> dict[str, torch.Tensor]:
    """One task's prompt (keys of ``PROMPT_KEYS``, each ``(prompt_length, ...)``; the mask optional), checked and
    completed, with a leading dimension of 1."""
    if not isinstance(prompt, Mapping):
        raise ValueError(f"prompt must be a dict with keys {list(PROMPT_KEYS)}, got {type(prompt).__name__}")
    batched = {}
    for key, value in prompt.items():
        if value is None:
            continue
        tensor = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value)
        if key in ("states", "actions", "returns_to_go"):
            tensor = tensor.float()
        batched[key] = tensor[None]
    if "returns_to_go" in batched and batched["returns_to_go"].dim() == 2:
        batched["returns_to_go"] = batched["returns_to_go"].unsqueeze(-1)
    for key, dims in (("states", config.state_dim), ("actions", config.act_dim)):
        if key in batched and tuple(batched[key].shape[1:]) != (config.prompt_length, dims):
            raise ValueError(
                f"prompt {key} must be (prompt_length={config.prompt_length}, {dims}) for this model, got "
                f"{tuple(batched[key].shape[1:])}"
            )
    checked = check_prompt(config, batched, 1)
    if not bool(checked["attention_mask"].any()):
        raise ValueError("prompt attention_mask is all zeros: the prompt needs at least one real step")
    return checked


def add_task(
    model: PreTrainedModel,  # a HarmoDTModel (typed by its base class: modeling_harmodt imports this module)
    name: str,
    *,
    prompt: Mapping | None = None,
    state_mean: Sequence[float],
    state_std: Sequence[float],
    target_return: float | None = None,
    mask: str | None = None,
    merge_threshold: int | None = None,
) -> int:
    """Append a task the model was not trained on; returns its task id. See :meth:`HarmoDTModel.add_task`.

    Everything is checked before anything changes: a refused task leaves the model as it was.
    """
    config = model.config
    if not isinstance(name, str) or not name:
        raise ValueError(f"The new task's name must be a non-empty string, got {name!r}")
    if name in config.task_names:
        raise ValueError(
            f"Task {name!r} is already one of the model's {config.num_tasks} tasks {config.task_names}: add a task "
            "under another name (its prompt and statistics are changed by adapting it, not by adding it again)"
        )
    mean = _vector(state_mean, config.state_dim, "state_mean")
    std = _vector(state_std, config.state_dim, "state_std")
    if min(std) < 0:
        raise ValueError("state_std must be non-negative")
    returns = config.target_returns
    target = float(np.mean(returns)) if target_return is None else float(target_return)
    if not math.isfinite(target):
        raise ValueError(f"target_return must be a finite number, got {target_return!r}")
    if config.use_prompt:
        if prompt is None:
            raise ValueError("This model uses task prompts: pass prompt= (e.g. from demonstrations of the new task)")
        new_prompt = check_new_task_prompt(config, prompt)
    elif prompt is not None:
        raise ValueError("This model does not use prompts (config.use_prompt=False): add the task without prompt=")
    if config.has_masks:
        mask = "merged" if mask is None else mask
        row_masks = new_task_masks(model, mask, merge_threshold)
        if mask == "merged" and merge_threshold is None:
            merge_threshold = default_merge_threshold(len(trained_task_ids(config)))
    elif mask is not None or merge_threshold is not None:
        raise ValueError("This model has no task masks (mask_mode='none'): add the task without mask=/merge_threshold=")

    # Every check passed: grow the per-task rows, then the config.
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MaskedLinear)}
    for layer_name, layer in layers.items():
        if layer.is_masked:
            grown = torch.cat([layer.task_masks(), row_masks[f"{layer_name}.weight"][None].to(torch.bool)])
            layer.packed_masks = layer.packed_masks.new_zeros(layer.num_tasks + 1, layer.packed_masks.shape[1])
            layer.num_tasks += 1
            layer.set_task_masks(grown)
            layer.drop_weight_cache()
        else:
            layer.num_tasks += 1
    if config.use_prompt:
        for key in PROMPT_KEYS:
            stored = getattr(model, f"stored_prompt_{key}")
            row = new_prompt[key].to(device=stored.device, dtype=stored.dtype).reshape(1, *stored.shape[1:])
            setattr(model, f"stored_prompt_{key}", torch.cat([stored.detach(), row]))
    config.task_names = [*config.task_names, name]
    config.state_mean = [*config.state_mean, mean]
    config.state_std = [*config.state_std, std]
    config.target_returns = [*returns, target]
    record = {"mask": mask} if config.has_masks else {}
    if merge_threshold is not None:
        record["merge_threshold"] = int(merge_threshold)
    config.added_tasks = {**added_tasks(config), name: record}
    model.task_name_crc32 = task_name_crc32(config.task_names).to(model.task_name_crc32.device)
    config.validate_harmodt()
    return config.num_tasks - 1
