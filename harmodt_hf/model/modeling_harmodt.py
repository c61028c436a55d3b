"""HarmoDTModel: a Prompt-DT GPT-2 body whose weights each task sees through its own binary mask."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_harmodt import HarmoDTConfig
from .masked_linear import MaskedLinear, TaskGroups
from .masks import erk_densities, erk_masks, pack_masks
from .transformer_body import BodyLayerNorm, HarmoDTTransformer

PROMPT_KEYS = ("states", "actions", "returns_to_go", "timesteps", "attention_mask")


@dataclass
class HarmoDTOutput(ModelOutput):
    """Output of :class:`HarmoDTModel`.

    Args:
        loss: masked MSE between predicted and target actions (when targets are given).
        action_preds: predicted actions, ``(batch, K, act_dim)`` (``(batch, 1, act_dim)`` with ``last_action_only``),
            in [-1, 1].
        last_hidden_state: final hidden states of the whole token sequence (prompt tokens first; the steps' tokens
            only when the prompt was passed as ``prompt_key_values``; the final two tokens with ``last_action_only``;
            the K state tokens with ``state_tokens_only``).
        hidden_states: hidden states after the embedding and after every block (``output_hidden_states=True``).
    """

    loss: torch.FloatTensor | None = None
    action_preds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class PromptKeyValues:
    """The keys and values every block computes for the prompt tokens of a batch (:meth:`HarmoDTModel.encode_prompt`).

    Prompt tokens come first and attention is causal, so they never see the episode's steps: their keys and values
    stay the same for a whole episode and can be computed once per task, then passed to every forward as
    ``prompt_key_values=`` instead of ``prompt=`` (about a fifth fewer token rows per forward at the paper size).

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


class HarmoDTPreTrainedModel(PreTrainedModel):
    config_class = HarmoDTConfig
    base_model_prefix = "harmodt"
    main_input_name = "states"
    supports_gradient_checkpointing = False
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """N(0, σ) with zero bias inside the transformer body; outer embeddings and heads keep PyTorch defaults."""
        if isinstance(module, MaskedLinear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
            if module.is_masked:
                _init_layer_masks(module, self.config.num_tasks)
        elif isinstance(module, BodyLayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, HarmoDTModel) and module.config.use_prompt:
            for key in PROMPT_KEYS:
                init.zeros_(getattr(module, f"stored_prompt_{key}"))


def _init_layer_masks(layer: MaskedLinear, num_tasks: int) -> None:
    """Draw the layer's ERK masks (its density and seed were set by the model) unless they were loaded."""
    buffer = layer.packed_masks
    if getattr(buffer, "_is_hf_initialized", False) or buffer.device.type == "meta":
        return
    density, seed = layer.mask_init
    generator = torch.Generator().manual_seed(seed)
    shape = (layer.out_features, layer.in_features)
    masks = erk_masks({"w": shape}, num_tasks, max(0.0, 1.0 - density), generator=generator)["w"]
    init.copy_(buffer, pack_masks(masks).to(buffer.device))


class HarmoDTModel(HarmoDTPreTrainedModel):
    """Multi-task Decision Transformer with a task prompt and one binary weight mask per task (HarmoDT).

    A batch may mix tasks: it is sorted by task id once, every masked layer computes one masked weight per task
    present, and the outputs are put back in the caller's order.
    """

    def __init__(self, config: HarmoDTConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.embed_timestep = nn.Embedding(config.max_ep_len, d)
        self.embed_return = nn.Linear(1, d)
        self.embed_state = nn.Linear(config.state_dim, d)
        self.embed_action = nn.Linear(config.act_dim, d)
        self.embed_ln = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        if config.use_prompt:
            self.prompt_embed_timestep = nn.Embedding(config.max_ep_len, d)
            self.prompt_embed_return = nn.Linear(1, d)
            self.prompt_embed_state = nn.Linear(config.state_dim, d)
            self.prompt_embed_action = nn.Linear(config.act_dim, d)
            # The per-task evaluation prompt (normalised states, scaled returns), stored so a loaded model can act.
            t, p = config.num_tasks, config.prompt_length
            self.register_buffer("stored_prompt_states", torch.zeros(t, p, config.state_dim))
            self.register_buffer("stored_prompt_actions", torch.zeros(t, p, config.act_dim))
            self.register_buffer("stored_prompt_returns_to_go", torch.zeros(t, p, 1))
            self.register_buffer("stored_prompt_timesteps", torch.zeros(t, p, dtype=torch.long))
            self.register_buffer("stored_prompt_attention_mask", torch.zeros(t, p, dtype=torch.long))
        self.transformer = HarmoDTTransformer(config)
        self.predict_action = nn.Linear(d, config.act_dim)
        self._assign_mask_init()
        self.post_init()

    # ----------------------------------------------------------------------------------------------- masks
    def masked_layers(self) -> dict[str, MaskedLinear]:
        """The task-masked layers by module name (empty for ``mask_mode='none'``)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, MaskedLinear) and m.is_masked}

    def get_task_masks(self) -> dict[str, torch.Tensor]:
        """``{parameter name: bool (num_tasks, out, in)}`` for every masked weight."""
        return {f"{name}.weight": layer.task_masks() for name, layer in self.masked_layers().items()}

    def set_task_masks(self, masks: dict[str, torch.Tensor], copy: bool = True) -> None:
        """Replace the masks; keys as in :meth:`get_task_masks`. Every masked weight must be given. With
        ``copy=False`` the layers may keep the given tensors (see :meth:`MaskedLinear.set_task_masks`)."""
        layers = self.masked_layers()
        expected = {f"{name}.weight" for name in layers}
        if set(masks) != expected:
            missing, extra = sorted(expected - set(masks)), sorted(set(masks) - expected)
            raise ValueError(f"set_task_masks needs exactly the masked weights; missing {missing}, unexpected {extra}")
        for name, layer in layers.items():
            layer.set_task_masks(masks[f"{name}.weight"], copy=copy)

    def _assign_mask_init(self) -> None:
        """Give every masked layer its ERK density (global over the body, 1 − sparsity overall) and its own seed,
        so that each layer draws its task masks independently when it is initialised."""
        layers = self.masked_layers()
        if not layers:
            return
        shapes = {name: (m.out_features, m.in_features) for name, m in layers.items()}
        densities = erk_densities(shapes, 1.0 - float(self.config.sparsity))
        for index, (name, layer) in enumerate(layers.items()):
            layer.mask_init = (densities[name], int(self.config.mask_seed) * 1_000_003 + index)

    def cache_masked_weights(self, enabled: bool = True) -> None:
        """Keep each task's masked weights ``W ⊙ M[t]`` between inference calls (no-grad forwards only).

        Speeds up acting (evaluation, rollouts) at the cost of masked copies of the body weights: ≈ 19 MB per task
        in float32 at the paper size, stacked per tuple of tasks for one batched matmul over equal task groups (the
        two latest tuples are kept), and once more per task when the groups differ in size. Caches are rebuilt when
        weights or masks change and dropped by ``cache_masked_weights(False)`` or by any forward with gradients.
        """
        for layer in self.masked_layers().values():
            layer.cache_masked_weights = enabled
            if not enabled:
                layer.drop_weight_cache()

    @contextmanager
    def masked_weights_cached(self) -> Iterator[None]:
        """Within the block, no-grad forwards use (and fill) the cache of :meth:`cache_masked_weights`; on exit every
        layer's setting is restored and what was built stays until a forward outside the cache (such a forward drops
        it) or ``cache_masked_weights(False)``. :class:`~harmodt_hf.evaluation.HarmoDTPolicy` acts inside it."""
        layers = list(self.masked_layers().values())
        previous = [layer.cache_masked_weights for layer in layers]
        for layer in layers:
            layer.cache_masked_weights = True
        try:
            yield
        finally:
            for layer, enabled in zip(layers, previous, strict=True):
                layer.cache_masked_weights = enabled

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` that refuses checkpoints whose task masks are missing or misshapen."""
        wants_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except RuntimeError as error:
            if "mismatched" in str(error) or "packed_masks" in str(error):
                raise ValueError(
                    "The checkpoint's tensors (task masks, stored prompts or weights) do not fit this configuration: "
                    "a different task count or model size. Load it with the config it was saved with."
                ) from error
            raise
        bad = [k for k in (*info.get("missing_keys", ()), *info.get("mismatched_keys", ())) if "packed_masks" in str(k)]
        if bad:
            raise ValueError(
                f"Checkpoint has no usable task masks for {len(bad)} masked layer(s) (e.g. {bad[0]}): it was not "
                "saved by HarmoDTModel with this mask_mode/task count. Load it with the config it was saved with; "
                "refusing to fill the masks at random."
            )
        return (model, info) if wants_info else model

    # ----------------------------------------------------------------------------------------------- prompts
    @torch.no_grad()
    def set_task_prompts(self, prompts: dict[str, torch.Tensor]) -> None:
        """Store one prompt per task (keys of ``PROMPT_KEYS``, leading dim ``num_tasks``), model-ready."""
        if not self.config.use_prompt:
            raise ValueError("This model does not use prompts (config.use_prompt=False)")
        for key in PROMPT_KEYS:
            buffer = getattr(self, f"stored_prompt_{key}")
            value = torch.as_tensor(prompts[key]).reshape(buffer.shape)
            buffer.copy_(value.to(device=buffer.device, dtype=buffer.dtype))

    def task_prompts(self, task_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored prompts for ``task_ids`` (a batch), ready to pass as ``prompt=``."""
        if not self.config.use_prompt:
            raise ValueError("This model does not use prompts (config.use_prompt=False)")
        if not bool(self.stored_prompt_attention_mask.any(dim=1).all()):
            raise ValueError("This model has no stored prompt for some task: call set_task_prompts(...) first")
        index = torch.as_tensor(task_ids, device=self.stored_prompt_states.device).long()
        return {key: getattr(self, f"stored_prompt_{key}")[index] for key in PROMPT_KEYS}

    # ----------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        returns_to_go: torch.Tensor,
        timesteps: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        prompt: dict[str, torch.Tensor] | None = None,
        prompt_key_values: PromptKeyValues | None = None,
        labels: torch.Tensor | None = None,
        return_loss: bool = False,
        output_hidden_states: bool = False,
        last_action_only: bool = False,
        state_tokens_only: bool = False,
        return_dict: bool | None = None,
    ) -> HarmoDTOutput | tuple:
        """Predict the action at every state token.

        Args:
            states: ``(B, K, state_dim)`` normalised observations.
            actions: ``(B, K, act_dim)`` actions (the one at step t is hidden from the prediction at step t).
            returns_to_go: ``(B, K)`` or ``(B, K, 1)``, already divided by ``config.return_scale``.
            timesteps: ``(B, K)`` integer episode steps, ``< config.max_ep_len``.
            attention_mask: ``(B, K)``, 1 for real steps, 0 for padding (default all ones).
            task_ids: ``(B,)`` task indices into ``config.task_names``; required with masks or prompts.
            prompt: dict with ``states``, ``actions``, ``returns_to_go``, ``timesteps`` and optional
                ``attention_mask`` of prompt length P; with ``config.use_prompt``, this or ``prompt_key_values``.
            prompt_key_values: the prompt already encoded by :meth:`encode_prompt` for these ``task_ids`` (the same
                actions as passing ``prompt``, computed without the prompt tokens); ``last_hidden_state`` and
                ``hidden_states`` then hold the steps' tokens only.
            labels: target actions ``(B, K, act_dim)``; with ``return_loss=True`` and no labels, ``actions`` are the
                targets.
            last_action_only: compute only what the last step's action needs (acting): ``action_preds`` is
                ``(B, 1, act_dim)``, the same as the last row of a full forward up to float rounding. The last block
                finishes only the final two tokens, the last state and the action token after it (two, not one: on
                CPU a single-row matmul takes another kernel, whose rounding would make a sample's action depend on
                the batch size); ``last_hidden_state`` holds those two tokens. Not with labels, ``return_loss`` or
                ``output_hidden_states``.
            state_tokens_only: the last block finishes only the K state tokens, the ones ``action_preds`` reads
                (training: the same predictions and loss for less work; the trainer passes it).
                ``last_hidden_state`` then holds those K tokens. Not with ``output_hidden_states`` or
                ``last_action_only``.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        config = self.config
        returns_to_go = returns_to_go if returns_to_go.dim() == 3 else returns_to_go.unsqueeze(-1)
        batch, length = states.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=states.device)
        self._check_inputs(states, actions, returns_to_go, timesteps, attention_mask, "")
        task_ids = self._check_task_ids(task_ids, batch, states.device)
        if config.use_prompt:
            if (prompt is None) == (prompt_key_values is None):
                raise ValueError(
                    "This model uses task prompts (config.use_prompt=True): pass exactly one of prompt=... and "
                    "prompt_key_values=... (from encode_prompt)"
                )
            if prompt is not None:
                prompt = self._normalise_prompt(prompt, batch, states.device)
            else:
                self._check_prompt_key_values(prompt_key_values, task_ids)
        elif prompt_key_values is not None:
            raise ValueError("This model does not use prompts (config.use_prompt=False): pass no prompt_key_values")
        if last_action_only and (labels is not None or return_loss or output_hidden_states):
            raise ValueError(
                "last_action_only=True computes the last step's action only: it cannot give a loss or hidden states "
                "(drop labels/return_loss/output_hidden_states, or run a full forward)"
            )
        if state_tokens_only and (output_hidden_states or last_action_only):
            raise ValueError(
                "state_tokens_only=True finishes only the state tokens in the last block: it cannot give every hidden "
                "state and does not combine with last_action_only"
            )
        if labels is None and return_loss:
            labels = actions

        order, inverse, groups = self._task_order(task_ids)

        def sort(t: torch.Tensor) -> torch.Tensor:
            return t if order is None else t[order]

        tokens, token_mask = self._embed_steps(
            sort(states), sort(actions), sort(returns_to_go), sort(timesteps), sort(attention_mask)
        )
        if prompt is not None:
            p_tokens, p_mask = self._embed_prompt({k: sort(v) for k, v in prompt.items()})
            tokens = torch.cat([p_tokens, tokens], dim=1)
            token_mask = torch.cat([p_mask, token_mask], dim=1)
        past = prompt_key_values if order is None or prompt_key_values is None else prompt_key_values.select(order)
        final_rows = None
        if last_action_only:  # the last state token and the (unread) action token after it
            final_rows = slice(-2, None)
        elif state_tokens_only:  # (return, state, action) per step, after the prompt tokens if any
            final_rows = slice(tokens.shape[1] - 3 * length + 1, None, 3)
        hidden, all_hidden = self.transformer(
            tokens, token_mask, groups, output_hidden_states, past=past, final_rows=final_rows
        )
        if last_action_only:  # the head on both rows, one two-row matmul per sample (see above); the state's kept
            head = self.predict_action
            weight = head.weight.T.expand(batch, -1, -1)
            action_preds = torch.tanh(torch.baddbmm(head.bias, hidden, weight)[:, :1])
        elif state_tokens_only:
            action_preds = torch.tanh(self.predict_action(hidden))
        else:
            step_hidden = hidden[:, -3 * length :].reshape(batch, length, 3, config.hidden_size)
            action_preds = torch.tanh(self.predict_action(step_hidden[:, :, 1]))
        if order is not None:
            action_preds = action_preds[inverse]
            hidden = hidden[inverse]
            all_hidden = tuple(h[inverse] for h in all_hidden) if all_hidden is not None else None

        loss = None
        if labels is not None:
            if labels.shape != action_preds.shape:
                raise ValueError(f"labels must have shape {tuple(action_preds.shape)}, got {tuple(labels.shape)}")
            valid = attention_mask.to(action_preds.dtype).unsqueeze(-1)
            squared = (action_preds - labels.to(action_preds.dtype)) ** 2 * valid
            loss = squared.sum() / (valid.sum().clamp_min(1.0) * config.act_dim)
        output = HarmoDTOutput(loss=loss, action_preds=action_preds, last_hidden_state=hidden, hidden_states=all_hidden)
        return output if return_dict else output.to_tuple()

    def _task_order(self, task_ids: torch.Tensor):
        """``(order, inverse, groups)``: the permutation that sorts the batch by task (``None`` when it already is)
        and its inverse, and the contiguous task groups the masked layers compute (``None`` without masks)."""
        order = inverse = groups = None
        if self.config.has_masks:
            if bool((task_ids[1:] < task_ids[:-1]).any()):
                order = torch.argsort(task_ids, stable=True)
                inverse = torch.empty_like(order)
                inverse[order] = torch.arange(task_ids.numel(), device=order.device)
            groups = TaskGroups.from_sorted_ids(task_ids if order is None else task_ids[order])
        return order, inverse, groups

    def encode_prompt(self, prompt: dict[str, torch.Tensor], task_ids: torch.Tensor) -> PromptKeyValues:
        """Every block's keys and values for the prompt tokens of a batch, to pass as ``prompt_key_values=``.

        ``prompt`` is as in :meth:`forward` (e.g. ``model.task_prompts(task_ids)``). The prompt precedes the steps
        and attention is causal, so the result does not depend on the steps: encode once per task and episode (the
        evaluation policy does) and reuse it at every step. Run it in the same precision (autocast) as the forwards.
        """
        if not self.config.use_prompt:
            raise ValueError("This model does not use prompts (config.use_prompt=False)")
        batch = prompt["states"].shape[0]
        device = prompt["states"].device
        task_ids = self._check_task_ids(task_ids, batch, device)
        prompt = self._normalise_prompt(prompt, batch, device)
        order, inverse, groups = self._task_order(task_ids)
        tokens, token_mask = self._embed_prompt({k: v if order is None else v[order] for k, v in prompt.items()})
        key_values: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.transformer(tokens, token_mask, groups, kv_out=key_values)
        encoded = PromptKeyValues(
            key_values=tuple(key_values),
            attention_mask=token_mask,
            task_ids=task_ids if order is None else task_ids[order],
        )
        return encoded if inverse is None else encoded.select(inverse)

    def _check_prompt_key_values(self, cache: PromptKeyValues, task_ids: torch.Tensor) -> None:
        if not isinstance(cache, PromptKeyValues):
            raise ValueError(f"prompt_key_values must come from encode_prompt, got {type(cache).__name__}")
        if len(cache.key_values) != self.config.n_layer:
            raise ValueError(
                f"prompt_key_values has {len(cache.key_values)} blocks, this model {self.config.n_layer}: it was "
                "encoded by another model"
            )
        if not torch.equal(cache.task_ids.to(task_ids.device), task_ids):
            raise ValueError(
                "prompt_key_values was encoded for other tasks than task_ids (or in another order): select its rows "
                "with prompt_key_values.select(index) to match the batch"
            )

    def _embed_steps(self, states, actions, returns_to_go, timesteps, attention_mask):
        time = self.embed_timestep(timesteps)
        stacked = torch.stack(
            (
                self.embed_return(returns_to_go) + time,
                self.embed_state(states) + time,
                self.embed_action(actions) + time,
            ),
            dim=2,
        )
        batch, length = states.shape[:2]
        tokens = self.embed_ln(stacked.reshape(batch, 3 * length, -1))
        token_mask = attention_mask.repeat_interleave(3, dim=1)
        return tokens, token_mask

    def _embed_prompt(self, prompt: dict[str, torch.Tensor]):
        time = self.prompt_embed_timestep(prompt["timesteps"])
        stacked = torch.stack(
            (
                self.prompt_embed_return(prompt["returns_to_go"]) + time,
                self.prompt_embed_state(prompt["states"]) + time,
                self.prompt_embed_action(prompt["actions"]) + time,
            ),
            dim=2,
        )
        batch, length = prompt["states"].shape[:2]
        return stacked.reshape(batch, 3 * length, -1), prompt["attention_mask"].repeat_interleave(3, dim=1)

    # ----------------------------------------------------------------------------------------------- validation
    def _check_inputs(self, states, actions, returns_to_go, timesteps, attention_mask, where: str) -> None:
        config = self.config
        name = "prompt " if where else ""
        if states.dim() != 3 or states.shape[-1] != config.state_dim:
            raise ValueError(f"{name}states must be (batch, steps, {config.state_dim}), got {tuple(states.shape)}")
        if actions.dim() != 3 or actions.shape[-1] != config.act_dim:
            raise ValueError(f"{name}actions must be (batch, steps, {config.act_dim}), got {tuple(actions.shape)}")
        batch, length = states.shape[:2]
        for label, tensor in (
            ("actions", actions),
            ("returns_to_go", returns_to_go),
            ("timesteps", timesteps),
            ("attention_mask", attention_mask),
        ):
            if tuple(tensor.shape[:2]) != (batch, length):
                raise ValueError(
                    f"{name}{label} has batch/steps {tuple(tensor.shape[:2])} but states has {(batch, length)}"
                )
        if returns_to_go.shape[-1] != 1 or returns_to_go.dim() != 3:
            raise ValueError(f"{name}returns_to_go must be (batch, steps) or (batch, steps, 1)")
        if timesteps.dtype.is_floating_point or timesteps.dim() != 2:
            raise ValueError(f"{name}timesteps must be an integer tensor of shape (batch, steps)")
        if timesteps.numel() and (int(timesteps.min()) < 0 or int(timesteps.max()) >= config.max_ep_len):
            raise ValueError(
                f"{name}timesteps must be in [0, max_ep_len={config.max_ep_len}); got range "
                f"[{int(timesteps.min())}, {int(timesteps.max())}]"
            )
        for label, tensor in (("states", states), ("actions", actions), ("returns_to_go", returns_to_go)):
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name}{label} contains NaN or infinite values")

    def _check_task_ids(self, task_ids, batch: int, device) -> torch.Tensor:
        config = self.config
        if task_ids is None:
            if config.has_masks or config.use_prompt:
                raise ValueError("task_ids is required: this model has per-task masks or prompts")
            return torch.zeros(batch, dtype=torch.long, device=device)
        task_ids = torch.as_tensor(task_ids, device=device).reshape(-1)
        if task_ids.numel() != batch:
            raise ValueError(f"task_ids must have one entry per sample ({batch}), got {task_ids.numel()}")
        if task_ids.dtype.is_floating_point:
            raise ValueError("task_ids must be integers")
        if batch and (int(task_ids.min()) < 0 or int(task_ids.max()) >= config.num_tasks):
            raise ValueError(
                f"task_ids must be in [0, {config.num_tasks}) for tasks {config.task_names}; got "
                f"[{int(task_ids.min())}, {int(task_ids.max())}]"
            )
        return task_ids.long()

    def _normalise_prompt(self, prompt: dict[str, torch.Tensor], batch: int, device) -> dict[str, torch.Tensor]:
        missing = [k for k in PROMPT_KEYS[:4] if k not in prompt]
        if missing:
            raise ValueError(f"prompt is missing {missing}; it needs keys {list(PROMPT_KEYS)}")
        prompt = dict(prompt)
        rtg = prompt["returns_to_go"]
        prompt["returns_to_go"] = rtg if rtg.dim() == 3 else rtg.unsqueeze(-1)
        if prompt.get("attention_mask") is None:
            shape = prompt["states"].shape[:2]
            prompt["attention_mask"] = torch.ones(shape, dtype=torch.long, device=device)
        self._check_inputs(
            prompt["states"],
            prompt["actions"],
            prompt["returns_to_go"],
            prompt["timesteps"],
            prompt["attention_mask"],
            "prompt",
        )
        if prompt["states"].shape[0] != batch:
            raise ValueError(f"prompt batch size {prompt['states'].shape[0]} differs from the batch size {batch}")
        return {k: prompt[k] for k in PROMPT_KEYS}

    def num_masked_parameters(self) -> int:
        """Number of weights covered by task masks (per task)."""
        return sum(m.weight.numel() for m in self.masked_layers().values())
