"""Checks of what enters :meth:`HarmoDTModel.forward <.modeling_harmodt.HarmoDTModel.forward>`, each failure naming the
input and the fix.

Shapes and dtypes are always checked (free). Values (finite inputs, timestep and task id ranges) are checked only
where that costs no device synchronisation: on CPU tensors, and the task ids of a masked model, which are read on the
host anyway to group the batch by task. On an accelerator the other values are the caller's to check where the data
enters (the collator, the policy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .configuration_harmodt import HarmoDTConfig

PROMPT_KEYS = ("states", "actions", "returns_to_go", "timesteps", "attention_mask")
STATE_STD_EPSILON = 1e-6  # states are normalised as (obs - mean) / (std + 1e-6), in training and when acting


@dataclass
class PromptKeyValues:
    """The keys and values every block computes for the prompt tokens of a batch (:meth:`HarmoDTModel.encode_prompt`).

    Prompt tokens come first and attention is causal, so they never see the episode's steps: their keys and values
    stay the same for a whole episode and can be computed once per task, then passed to every forward as
    ``prompt_key_values=`` instead of a prompt (about a fifth fewer token rows per forward at the paper size).

    Args:
        key_values: one ``(keys, values)`` pair per block, each ``(batch, n_head, 3 * prompt_length, head_dim)``.
        attention_mask: ``(batch, 3 * prompt_length)`` token mask of the prompt (1 = real).
        task_ids: ``(batch,)`` the task each row was computed for (checked against the forward's ``task_ids``).
    """

    key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    attention_mask: torch.Tensor
    task_ids: torch.Tensor

    def select(self, index: torch.Tensor) -> PromptKeyValues:
        """The rows ``index`` of the batch (a new object; for reordering or picking running episodes)."""
        index = torch.as_tensor(index, device=self.task_ids.device)
        return PromptKeyValues(
            key_values=tuple((k[index], v[index]) for k, v in self.key_values),
            attention_mask=self.attention_mask[index],
            task_ids=self.task_ids[index],
        )


def check_steps(
    config: HarmoDTConfig, states, actions, returns_to_go, timesteps, attention_mask, name: str = ""
) -> None:
    """A sequence of steps (``name="prompt "`` for a prompt): ``(B, L, ...)`` tensors of matching batch and length."""
    if states.dim() != 3 or states.shape[-1] != config.state_dim:
        raise ValueError(f"{name}states must be (batch, steps, {config.state_dim}), got {tuple(states.shape)}")
    if actions.dim() != 3 or actions.shape[-1] != config.act_dim:
        raise ValueError(f"{name}actions must be (batch, steps, {config.act_dim}), got {tuple(actions.shape)}")
    inputs = dict(actions=actions, returns_to_go=returns_to_go, timesteps=timesteps, attention_mask=attention_mask)
    for label, tensor in inputs.items():
        if tuple(tensor.shape[:2]) != tuple(states.shape[:2]):
            raise ValueError(
                f"{name}{label} has batch/steps {tuple(tensor.shape[:2])} but states has {tuple(states.shape[:2])}"
            )
    if returns_to_go.shape[-1] != 1 or returns_to_go.dim() != 3:
        raise ValueError(f"{name}returns_to_go must be (batch, steps) or (batch, steps, 1)")
    if timesteps.dtype.is_floating_point or timesteps.dim() != 2:
        raise ValueError(f"{name}timesteps must be an integer tensor of shape (batch, steps)")
    if states.device.type != "cpu":
        return
    if timesteps.numel() and (int(timesteps.min()) < 0 or int(timesteps.max()) >= config.max_ep_len):
        raise ValueError(
            f"{name}timesteps must be in [0, max_ep_len={config.max_ep_len}); got range "
            f"[{int(timesteps.min())}, {int(timesteps.max())}]"
        )
    for label, tensor in (("states", states), ("actions", actions), ("returns_to_go", returns_to_go)):
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name}{label} contains NaN or infinite values")


def check_task_ids(config: HarmoDTConfig, task_ids, size: int, device) -> tuple[torch.Tensor, list[int] | None]:
    """The ``(B,)`` int64 task ids on ``device``, and the same as a list when they were read on the host: always for a
    masked model (it groups the batch by task; no device synchronisation when the ids are given on the CPU), and
    whenever they are on the CPU."""
    if task_ids is None:
        if config.has_masks or config.use_prompt:
            raise ValueError("task_ids is required: this model has per-task masks or prompts")
        return torch.zeros(size, dtype=torch.long, device=device), None
    task_ids = torch.as_tensor(task_ids).reshape(-1)
    if task_ids.numel() != size:
        raise ValueError(f"task_ids must have one entry per sample ({size}), got {task_ids.numel()}")
    if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
        raise ValueError("task_ids must be integers")
    host_ids = task_ids.tolist() if config.has_masks or task_ids.device.type == "cpu" else None
    if host_ids and not all(0 <= t < config.num_tasks for t in host_ids):
        raise ValueError(
            f"task_ids must be in [0, {config.num_tasks}) for tasks {config.task_names}; got "
            f"[{min(host_ids)}, {max(host_ids)}]"
        )
    return task_ids.to(device=device, dtype=torch.long), host_ids


def check_prompt(config: HarmoDTConfig, prompt: dict, size: int) -> dict[str, torch.Tensor]:
    """A prompt dict (keys of ``PROMPT_KEYS``, the mask optional) for a batch of ``size``, completed and checked."""
    missing = [k for k in PROMPT_KEYS[:4] if prompt.get(k) is None]
    if missing:
        raise ValueError(f"prompt is missing {missing}; it needs {list(PROMPT_KEYS)} (the mask is optional)")
    prompt = dict(prompt)
    rtg = prompt["returns_to_go"]
    prompt["returns_to_go"] = rtg if rtg.dim() == 3 else rtg.unsqueeze(-1)
    if prompt.get("attention_mask") is None:
        prompt["attention_mask"] = torch.ones(prompt["states"].shape[:2], dtype=torch.long, device=rtg.device)
    prompt = {k: prompt[k] for k in PROMPT_KEYS}
    check_steps(config, *prompt.values(), name="prompt ")
    if prompt["states"].shape[0] != size:
        raise ValueError(f"prompt batch size {prompt['states'].shape[0]} differs from the batch size {size}")
    return prompt


def check_prompt_key_values(config: HarmoDTConfig, encoded: PromptKeyValues, task_ids: torch.Tensor) -> None:
    """``prompt_key_values`` from ``encode_prompt`` of a model of this size, for these ``task_ids`` (on the CPU)."""
    if not isinstance(encoded, PromptKeyValues):
        raise ValueError(f"prompt_key_values must come from encode_prompt, got {type(encoded).__name__}")
    if len(encoded.key_values) != config.n_layer:
        raise ValueError(
            f"prompt_key_values has {len(encoded.key_values)} blocks, this model {config.n_layer}: it was encoded by "
            "another model"
        )
    if task_ids.device.type == "cpu" and not torch.equal(encoded.task_ids.to(task_ids.device), task_ids):
        raise ValueError(
            "prompt_key_values was encoded for other tasks than task_ids (or in another order): select its rows with "
            "prompt_key_values.select(index) to match the batch"
        )


def episode_inputs(config: HarmoDTConfig, task: int, states, actions=None, rewards=None, target_return=None) -> dict:
    """The model inputs ``(1, K, ...)`` for the current step of one episode of ``task`` from its raw history, as the
    policy builds them: states normalised with the task's mean/std, returns-to-go from the target return minus the
    rewards so far (divided by ``return_scale``), the last K = ``context_length`` steps, left-padded."""
    states = np.asarray(states, dtype=np.float32).reshape(-1, config.state_dim)
    steps = states.shape[0]
    actions = np.zeros((0, config.act_dim)) if actions is None else np.asarray(actions, dtype=np.float32)
    rewards = np.zeros(0) if rewards is None else np.asarray(rewards, dtype=np.float64).reshape(-1)
    actions = actions.reshape(-1, config.act_dim)
    if actions.shape[0] != steps - 1 or rewards.shape[0] != steps - 1:
        raise ValueError(f"got {steps} states: pass the {steps - 1} actions and rewards that came after them")
    if steps > config.max_ep_len:
        raise ValueError(f"the episode has {steps} steps, more than max_ep_len={config.max_ep_len}")
    target = config.target_returns[task] if target_return is None else float(target_return)
    returns = np.subtract.accumulate(np.concatenate([[target], rewards]) / config.return_scale)
    mean, std = (torch.tensor(values[task], dtype=torch.float32) for values in (config.state_mean, config.state_std))
    start = max(0, steps - config.context_length)
    history = dict(
        states=(torch.from_numpy(states[start:]) - mean) / (std + STATE_STD_EPSILON),
        actions=torch.from_numpy(np.concatenate([actions, np.zeros((1, config.act_dim), np.float32)])[start:]),
        returns_to_go=torch.from_numpy(returns[start:, None]).float(),
        timesteps=torch.arange(start, steps),
        attention_mask=torch.ones(steps - start, dtype=torch.long),
    )
    pad = config.context_length - (steps - start)
    return {key: torch.cat([value.new_zeros(pad, *value.shape[1:]), value])[None] for key, value in history.items()}
