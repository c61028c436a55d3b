"""The stateful batched policy: :class:`HarmoDTPolicy` acts for many episodes at once, of any mix of tasks."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from harmodt_hf.cpu_features import warn_if_bf16_is_emulated
from harmodt_hf.model.modeling_harmodt import PromptKeyValues
from harmodt_hf.training.segments import STD_EPS as STD_EPSILON  # states: (obs - mean) / (std + 1e-6), as in training

# Inference precisions: the autocast dtype of the model's forward (None: autocast off, the model's own dtype).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is one of :data:`PRECISIONS`; otherwise raise ``ValueError`` naming them."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return precision


class HarmoDTPolicy:
    """A stateful HarmoDT policy for many episodes at once, of any mix of tasks.

    Each episode lives in a *slot*; the policy keeps per slot the context window of the last ``K`` steps (left-padded
    with zeros and mask 0), the timestep, the return-to-go and the task's prompt and normalisation. Everything comes
    from the model's config: state mean/std, ``target_returns``, ``return_scale`` and the stored prompts.

    The policy does not change the model's train/eval mode: call ``model.eval()`` first (``evaluate`` does). It acts
    inside ``model.masked_weights_cached()``: each task's masked weights ``W ⊙ M[t]`` are built once and kept until
    another forward or ``model.cache_masked_weights(False)`` drops them.

    ``precision="fp32"`` (the default, as the official evaluation) runs the model in its own dtype with autocast off;
    ``"bf16"`` runs its forward under ``torch.autocast(device_type, torch.bfloat16)``. Either way the context window
    is kept in the model's dtype and :meth:`act` returns float32 actions.

    ``cache_prompt=True`` (the default) encodes each task's prompt once per episode
    (:meth:`~harmodt_hf.HarmoDTModel.encode_prompt`) and runs every step on the episode's tokens only;
    ``last_action_only=True`` (the default) computes only what the action reads. Both give the same actions up to
    float rounding; ``False`` runs the full forward with the prompt tokens at every step, as the official Prompt-DT
    evaluation does (the speed-ups are in benchmarks/RESULTS.md).

    Example::

        policy = HarmoDTPolicy(model)
        policy.reset(["reach-v3", "push-v3"])
        actions = policy.act(observations)                # first step: no reward yet
        actions = policy.act(observations, rewards)       # rewards received after the previous actions
        actions = policy.act(observations[:1], rewards[:1], active=[1])   # slot 0 has ended: only slot 1 runs
    """

    def __init__(
        self, model: torch.nn.Module, precision: str = "fp32", cache_prompt: bool = True, last_action_only: bool = True
    ) -> None:
        self.model = model
        self.config = model.config
        self.precision = check_precision(precision)
        self.cache_prompt = bool(cache_prompt) and bool(self.config.use_prompt)
        self.last_action_only = bool(last_action_only)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.precision == "bf16":
            warn_if_bf16_is_emulated(self.device, "The policy", 'Use precision="fp32" on this machine.')
        self._allocate(0)

    def _autocast(self) -> torch.autocast:
        dtype = PRECISIONS[self.precision]
        if dtype is None:  # fp32 also inside an enclosing autocast region (e.g. a training step's)
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=dtype)

    def _weights_cached(self) -> contextlib.AbstractContextManager:
        """The model's masked-weight cache for one call (a plain ``nn.Module`` without one: nothing)."""
        cached = getattr(self.model, "masked_weights_cached", None)
        return cached() if cached is not None else contextlib.nullcontext()

    @property
    def num_slots(self) -> int:
        return int(self._task_ids.numel())

    @property
    def task_ids(self) -> list[int]:
        """Task id of every slot."""
        return self._task_ids.tolist()

    @property
    def steps(self) -> list[int]:
        """Steps already taken in every slot's episode (the timestep of its next observation)."""
        return self._steps.tolist()

    def _allocate(self, n: int) -> None:
        config, dev, k = self.config, self.device, self.config.context_length
        self._task_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self._steps = np.zeros(n, dtype=np.int64)
        self._rtg = np.zeros(n, dtype=np.float64)  # current return-to-go, already divided by return_scale
        self._mean = torch.zeros(n, config.state_dim, device=dev)
        self._std = torch.ones(n, config.state_dim, device=dev)
        self._window = {  # every slot's context window, by the name of the model's forward argument
            "states": torch.zeros(n, k, config.state_dim, dtype=self.dtype, device=dev),
            "actions": torch.zeros(n, k, config.act_dim, dtype=self.dtype, device=dev),
            "returns_to_go": torch.zeros(n, k, 1, dtype=self.dtype, device=dev),
            "timesteps": torch.zeros(n, k, dtype=torch.long, device=dev),
            "attention_mask": torch.zeros(n, k, dtype=torch.long, device=dev),
        }
        self._prompt: dict[str, torch.Tensor] | PromptKeyValues | None = None
        # The encoded prompts picked out for recent sets of active slots (a pipelined evaluation alternates two).
        self._picked_prompts: dict[bytes, PromptKeyValues] = {}

    def _resolve_task_ids(self, tasks: Sequence[int | str]) -> list[int]:
        ids = []
        for task in tasks:
            if isinstance(task, str):
                ids.append(self.config.task_id(task))
            elif isinstance(task, (int, np.integer)) and 0 <= int(task) < self.config.num_tasks:
                ids.append(int(task))
            else:
                raise ValueError(
                    f"Task {task!r} is neither a task name nor a task id in [0, {self.config.num_tasks}) of this "
                    f"model's tasks {self.config.task_names}"
                )
        return ids

    def _slot_index(self, slots: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
        index = np.asarray(slots, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.num_slots):
            raise ValueError(f"{what} must be slot indices in [0, {self.num_slots}), got {index.tolist()}")
        if len(np.unique(index)) != index.size:
            raise ValueError(f"{what} has duplicate slots: {index.tolist()}")
        return index

    def reset(self, tasks: Sequence[int | str], slots: Sequence[int] | None = None) -> None:
        """Start episodes of ``tasks`` (names or ids).

        Without ``slots``: forget all episodes and start one per entry of ``tasks`` (slots ``0..n-1``). With
        ``slots``: restart only those slots (one task per slot); the other slots go on untouched.
        """
        ids = self._resolve_task_ids(list(tasks))
        if slots is None:
            self._allocate(len(ids))
            index = np.arange(len(ids))
        else:
            index = self._slot_index(slots, "slots")
            if index.size != len(ids):
                raise ValueError(f"reset got {len(ids)} tasks for {index.size} slots")
        if not index.size:
            return
        config = self.config
        ix = torch.as_tensor(index, device=self.device)
        task_ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        self._task_ids[ix] = task_ids
        self._steps[index] = 0
        self._rtg[index] = np.asarray([config.target_returns[i] for i in ids], dtype=np.float64) / config.return_scale
        self._mean[ix] = torch.tensor([config.state_mean[i] for i in ids], dtype=torch.float32, device=self.device)
        self._std[ix] = torch.tensor([config.state_std[i] for i in ids], dtype=torch.float32, device=self.device)
        for buffer in self._window.values():
            buffer[ix] = 0
        if config.use_prompt:
            self._store_prompts(ix, task_ids, fresh=self._prompt is None or slots is None)
            self._picked_prompts = {}

    @torch.inference_mode()
    def _store_prompts(self, ix: torch.Tensor, task_ids: torch.Tensor, fresh: bool) -> None:
        """Keep the slots' prompts: raw, or encoded once per distinct task (``cache_prompt``)."""
        if not self.cache_prompt:
            prompts = self.model.task_prompts(task_ids)
            if fresh:
                self._prompt = {key: value.clone() for key, value in prompts.items()}
            else:
                for key, value in prompts.items():
                    self._prompt[key][ix] = value
            return
        distinct, slot_rows = torch.unique(task_ids, return_inverse=True)
        with self._autocast(), self._weights_cached():
            encoded = self.model.encode_prompt(self.model.task_prompts(distinct), distinct).select(slot_rows)
        if fresh:
            self._prompt = encoded
            return
        stored = self._prompt
        for (keys, values), (new_keys, new_values) in zip(stored.key_values, encoded.key_values, strict=True):
            keys[ix], values[ix] = new_keys, new_values
        stored.attention_mask[ix] = encoded.attention_mask
        stored.task_ids[ix] = encoded.task_ids

    def _pick_prompts(self, index: np.ndarray, ix: torch.Tensor) -> PromptKeyValues:
        """The encoded prompts of the active slots, copied out once per set of active slots, not at every step."""
        if index.size == self.num_slots and bool((index == np.arange(index.size)).all()):
            return self._prompt
        key = index.tobytes()
        if key not in self._picked_prompts:
            if len(self._picked_prompts) >= 2:
                self._picked_prompts.pop(next(iter(self._picked_prompts)))
            self._picked_prompts[key] = self._prompt.select(ix)
        return self._picked_prompts[key]

    def _slot_names(self, index: np.ndarray, bad: np.ndarray) -> str:
        """``slot 3 (reach-v3), slot 5 (push-v3)`` for the slots of ``index`` where ``bad`` holds."""
        names = self.config.task_names
        return ", ".join(f"slot {int(i)} ({names[int(self._task_ids[int(i)])]})" for i in index[bad])

    def _check_inputs(self, obs: np.ndarray, rewards, index: np.ndarray) -> np.ndarray:
        """Validate one call for every slot before anything changes; returns the slots' new returns-to-go."""
        config = self.config
        bad = ~np.isfinite(obs).all(axis=1)
        if bad.any():
            raise ValueError(f"non-finite observation for {self._slot_names(index, bad)}: no slot was changed")
        too_long = self._steps[index] >= config.max_ep_len
        if too_long.any():
            raise ValueError(
                f"episode in {self._slot_names(index, too_long)} reached max_ep_len={config.max_ep_len} steps: the "
                "model has no timestep embedding beyond that"
            )
        rtg = self._rtg[index].copy()
        started = self._steps[index] > 0
        if started.any():
            if rewards is None:
                raise ValueError("rewards are required once an episode has taken a step (got rewards=None)")
            rew = np.asarray(rewards, dtype=np.float64).reshape(-1)
            if rew.size != index.size:
                raise ValueError(f"got {rew.size} rewards for {index.size} active episodes")
            bad = started & ~np.isfinite(rew)
            if bad.any():
                raise ValueError(f"non-finite reward for {self._slot_names(index, bad)}: no slot was changed")
            rtg[started] -= rew[started] / config.return_scale
        bad = ~torch.isfinite(torch.as_tensor(rtg).to(self.dtype)).numpy()
        if bad.any():
            raise ValueError(
                f"the return-to-go of {self._slot_names(index, bad)} leaves the range of {self.dtype} "
                f"({rtg[bad].tolist()} after dividing by return_scale={config.return_scale}): a reward is out of "
                "range; no slot was changed"
            )
        return rtg

    @torch.inference_mode()
    def act(
        self,
        observations: np.ndarray,
        rewards: np.ndarray | Sequence[float] | None = None,
        active: Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Actions ``(n, act_dim)`` for the running episodes in ``active`` (default: every slot).

        The whole call is checked first (shapes, finite observations and rewards, a return-to-go the model's dtype
        can hold), and the slots change only once the model has given a finite action for every one of them: a
        ``ValueError`` naming the slots leaves every slot as it was, so later calls go on as if it had not happened.

        Args:
            observations: ``(n, state_dim)`` raw observations, one per active slot, in the order of ``active``.
            rewards: reward received after each active slot's previous action (decrements its return-to-go by
                ``reward / return_scale``); ignored for slots at their first step, required for the others.
            active: the slots to act for; ended episodes are simply left out and cost nothing.
        """
        config = self.config
        index = np.arange(self.num_slots) if active is None else self._slot_index(active, "active")
        obs = np.asarray(observations, dtype=np.float64)
        if obs.ndim == 1 and index.size == 1:
            obs = obs[None]
        if obs.ndim != 2 or obs.shape[1] != config.state_dim:
            raise ValueError(
                f"observations must be (n, state_dim={config.state_dim}) for this model, got shape {obs.shape}"
            )
        if obs.shape[0] != index.size:
            raise ValueError(f"got {obs.shape[0]} observations for {index.size} active episodes")
        if not index.size:
            return np.zeros((0, config.act_dim), dtype=np.float32)
        rtg = self._check_inputs(obs, rewards, index)

        # The slots' next context windows, built apart and stored only once the action is known to be finite.
        ix = torch.as_tensor(index, device=self.device)
        window = {name: buffer[ix].roll(-1, dims=1) for name, buffer in self._window.items()}
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        normalised = ((obs_t - self._mean[ix]) / (self._std[ix] + STD_EPSILON)).to(self.dtype)
        bad = ~torch.isfinite(normalised).all(dim=1).cpu().numpy()
        if bad.any():
            raise ValueError(
                f"the normalised observation of {self._slot_names(index, bad)} leaves the range of {self.dtype}: "
                "no slot was changed"
            )
        window["states"][:, -1] = normalised
        window["actions"][:, -1] = 0
        window["returns_to_go"][:, -1, 0] = torch.as_tensor(rtg, dtype=self.dtype, device=self.device)
        window["timesteps"][:, -1] = torch.as_tensor(self._steps[index], device=self.device)
        window["attention_mask"][:, -1] = 1

        prompt = {}
        if isinstance(self._prompt, PromptKeyValues):
            prompt["prompt_key_values"] = self._pick_prompts(index, ix)
        elif self._prompt is not None:
            prompt["prompt"] = {key: value[ix] for key, value in self._prompt.items()}
        with self._autocast(), self._weights_cached():
            output = self.model(
                **window,
                task_ids=self._task_ids[ix],
                last_action_only=self.last_action_only,
                return_dict=True,
                **prompt,
            )
        action = output.action_preds[:, -1]
        bad = ~torch.isfinite(action).all(dim=1).cpu().numpy()
        if bad.any():
            raise ValueError(
                f"the model gave a non-finite action for {self._slot_names(index, bad)} at steps "
                f"{self._steps[index][bad].tolist()} (returns-to-go {rtg[bad].tolist()}): no slot was changed"
            )
        window["actions"][:, -1] = action.to(self.dtype)
        for name, buffer in self._window.items():
            buffer[ix] = window[name]
        self._rtg[index] = rtg
        self._steps[index] += 1
        return action.float().cpu().numpy()


__all__ = ["PRECISIONS", "STD_EPSILON", "HarmoDTPolicy", "check_precision"]
