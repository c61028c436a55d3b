"""HarmoDTModel: a Prompt Decision Transformer (a GPT-2 body) whose weights each task sees through its own binary mask.

Token layout (Prompt-DT, as in the paper): the task prompt's P steps, then the episode's K steps, three tokens per step
(return-to-go R, state s, action a)::

    [R_1 s_1 a_1 ... R_P s_P a_P]  [R_1 s_1 a_1 ... R_K s_K a_K]
     prompt (its own embeddings)     episode steps

Attention is causal; the action a_t is predicted from the final hidden state of s_t, which has not seen a_t. Every
linear layer of the transformer body is a :class:`~.masked_linear.MaskedLinear`: task t computes with ``W ⊙ M_t``.

This folder is the code a Hub model loads with ``trust_remote_code=True``: it imports only torch, numpy,
transformers and its own modules.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_harmodt import HarmoDTConfig
from .inputs import (
    PROMPT_KEYS,
    PromptKeyValues,
    check_prompt,
    check_prompt_key_values,
    check_steps,
    check_task_ids,
    episode_inputs,
)
from .loading import check_loaded_model, check_pretrained_source, task_name_crc32
from .masked_linear import MaskedLinear, TaskBatch, TaskGroups
from .masks import erk_densities, erk_masks, pack_masks
from .new_tasks import add_task

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_new": lambda: nn.GELU("tanh"), "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclass
class HarmoDTOutput(ModelOutput):
    """Output of :class:`HarmoDTModel`.

    Args:
        loss: masked MSE between predicted and target actions (when targets are given).
        action_preds: predicted actions in [-1, 1], ``(batch, K, act_dim)`` (``(batch, 1, act_dim)`` with
            ``last_action_only``).
        last_hidden_state: final hidden states of the token sequence (prompt tokens first; the steps' tokens only
            when the prompt was passed as ``prompt_key_values``; the final two tokens with ``last_action_only``; the K
            state tokens with ``state_tokens_only``).
        hidden_states: the input of every block and the final hidden states (``output_hidden_states``).
        attentions: every block's attention weights ``(batch, n_head, queries, keys)`` (``output_attentions``).
    """

    loss: torch.FloatTensor | None = None
    action_preds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ------------------------------------------------------------------------------------------------ transformer body
class HarmoDTAttention(nn.Module):
    """Causal self-attention with task-masked projections; padding logits get -1e4 as in GPT-2. Computed by SDPA or,
    with ``attn_implementation="eager"`` (or when attention weights are asked for), by an explicit softmax."""

    def __init__(self, config: HarmoDTConfig) -> None:
        super().__init__()
        d, masked = config.hidden_size, config.has_masks
        self.config = config
        self.n_head = config.n_head
        self.c_attn = MaskedLinear(d, 3 * d, config.num_tasks, masked)
        self.c_proj = MaskedLinear(d, d, config.num_tasks, masked)
        self.attn_dropout = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, attn_bias, batch: TaskBatch, past=None, kv_out=None, rows=None, output_attentions=False):
        """Attend from ``x``'s tokens to ``past`` keys/values (prompt tokens, if given) and to ``x``'s own; with
        ``kv_out``, this block's keys and values of ``x`` are appended to it; with ``rows``, only the tokens
        ``x[:, rows]`` attend (every token still gives its key and value). Returns the output and the attention
        weights in the caller's order (``None`` unless ``output_attentions``)."""
        size, length, d = x.shape
        q, k, v = self.c_attn(x, batch.groups).split(d, dim=-1)
        q, k, v = (t.view(size, length, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_out is not None:
            kv_out.append((k, v))
        if rows is not None:
            q, attn_bias = q[:, :, rows], attn_bias[:, :, rows]
        if past is not None:
            k, v = torch.cat((past[0].to(k.dtype), k), dim=2), torch.cat((past[1].to(v.dtype), v), dim=2)
        dtype = q.dtype
        # Kept fast path: under bf16 autocast on CPU, PyTorch's bf16 attention backward took ~4x the float32 time
        # (773 vs 190 ms per layer, AMX Xeon, benchmarks/RESULTS.md): attend in float32 there when training.
        if q.device.type == "cpu" and dtype != torch.float32 and torch.is_grad_enabled():
            with torch.autocast("cpu", enabled=False):
                y, weights = self._attend(q.float(), k.float(), v.float(), attn_bias.float(), batch, output_attentions)
        else:
            y, weights = self._attend(q, k, v, attn_bias, batch, output_attentions)
        y = y.to(dtype).transpose(1, 2).reshape(size, q.shape[2], d)
        return self.resid_dropout(self.c_proj(y, batch.groups)), weights

    def _attend(self, q, k, v, attn_bias, batch: TaskBatch, output_attentions: bool):
        dropout = self.attn_dropout if self.training else 0.0
        if not output_attentions and self.config._attn_implementation != "eager":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout), None
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + attn_bias, dim=-1)
        weights = None
        if output_attentions:
            weights, probs = batch.record(probs)
        return (F.dropout(probs, dropout) if dropout else probs) @ v, weights


class HarmoDTMLP(nn.Module):
    def __init__(self, config: HarmoDTConfig) -> None:
        super().__init__()
        masked = config.has_masks
        self.c_fc = MaskedLinear(config.hidden_size, config.n_inner, config.num_tasks, masked)
        self.c_proj = MaskedLinear(config.n_inner, config.hidden_size, config.num_tasks, masked)
        self.act = ACTIVATIONS[config.activation_function]()
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, groups: TaskGroups | None) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x, groups)), groups))


class HarmoDTBlock(nn.Module):
    """Pre-LayerNorm GPT-2 block."""

    def __init__(self, config: HarmoDTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = HarmoDTAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = HarmoDTMLP(config)

    def forward(self, x, attn_bias, batch: TaskBatch, past=None, kv_out=None, rows=None, output_attentions=False):
        """``rows``: finish only the tokens ``x[:, rows]`` (see :meth:`HarmoDTAttention.forward`)."""
        attended, weights = self.attn(self.ln_1(x), attn_bias, batch, past, kv_out, rows, output_attentions)
        x = (x if rows is None else x[:, rows]) + attended
        return x + self.mlp(self.ln_2(x), batch.groups), weights


class HarmoDTTransformer(nn.Module):
    """The GPT-2 body without token or position embeddings: the part the task masks apply to."""

    def __init__(self, config: HarmoDTConfig) -> None:
        super().__init__()
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(HarmoDTBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(
        self, tokens, token_mask, batch: TaskBatch, past=None, kv_out=None, final_rows=None, output_hidden_states=False,
        output_attentions=False,
    ):  # fmt: skip
        """Run the blocks on ``tokens`` (sorted by task); ``past`` holds the prompt tokens' keys/values, ``kv_out``
        collects each block's keys/values; with ``final_rows``, the last block finishes only the tokens
        ``tokens[:, final_rows]``. Returns the final hidden states in the caller's order, every block's input and the
        final states (``output_hidden_states``) and every block's attention weights (``output_attentions``)."""
        length = tokens.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
        allowed = causal[None, None] & token_mask[:, None, None, :].bool()
        if past is not None:
            prefix = past.attention_mask[:, None, None, :].bool().expand(-1, 1, length, -1)
            allowed = torch.cat((prefix, allowed), dim=-1)
        attn_bias = torch.zeros(allowed.shape, dtype=tokens.dtype, device=tokens.device).masked_fill(~allowed, -1e4)
        x = self.drop(tokens)
        hidden, attentions = [], []
        for index, block in enumerate(self.h):
            if output_hidden_states:
                recorded, x = batch.record(x)
                hidden.append(recorded)
            rows = final_rows if index == len(self.h) - 1 else None
            block_past = past.key_values[index] if past is not None else None
            x, weights = block(x, attn_bias, batch, block_past, kv_out, rows, output_attentions)
            attentions.append(weights)
        x = self.ln_f(batch.unsort(x))
        hidden.append(x)
        return x, (tuple(hidden) if output_hidden_states else None), (tuple(attentions) if output_attentions else None)


# ------------------------------------------------------------------------------------------------ model
class HarmoDTPreTrainedModel(PreTrainedModel):
    config_class = HarmoDTConfig
    base_model_prefix = "harmodt"
    main_input_name = "states"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _keys_to_ignore_on_load_missing = ["task_name_crc32"]  # checkpoints saved before it existed load as before

    def _init_weights(self, module: nn.Module) -> None:
        """Every parameter and buffer: N(0, σ) weights and zero biases in the body (as the official code), PyTorch's
        default distributions for the outer embeddings and heads, unit LayerNorms, the ERK task masks (drawn from
        ``config.mask_seed``), empty stored prompts and the task-name checksums of the config."""
        if isinstance(module, MaskedLinear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.bias)
            if module.is_masked:
                _init_layer_masks(module)
        elif isinstance(module, nn.Linear):  # nn.Linear's own reset_parameters, through the guarded init functions
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.in_features)
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, HarmoDTModel):
            init.copy_(module.task_name_crc32, task_name_crc32(module.config.task_names))
            for key in PROMPT_KEYS if module.config.use_prompt else ():
                init.zeros_(getattr(module, f"stored_prompt_{key}"))

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """Only ``"sdpa"`` (the default) and ``"eager"``: refuse anything else when the model is built."""
        if requested_attention not in (None, *ATTENTION_IMPLEMENTATIONS):
            raise ValueError(
                f"HarmoDTModel computes attention with {ATTENTION_IMPLEMENTATIONS} only, got "
                f"attn_implementation={requested_attention!r}: pass attn_implementation='sdpa' or 'eager'"
            )
        return super().get_correct_attn_implementation(requested_attention, is_init_check)


def _init_layer_masks(layer: MaskedLinear) -> None:
    """Draw the layer's ERK masks (its density and seed were set by the model) unless they were loaded or set."""
    buffer = layer.packed_masks
    if getattr(buffer, "_is_hf_initialized", False) or buffer.device.type == "meta":
        return
    density, seed = layer.mask_init
    generator = torch.Generator().manual_seed(seed)
    shape = (layer.out_features, layer.in_features)
    masks = erk_masks({"w": shape}, layer.num_tasks, max(0.0, 1.0 - density), generator=generator)["w"]
    init.copy_(buffer, pack_masks(masks).to(buffer.device))
    buffer._is_hf_initialized = True  # drawn once: init_weights after __init__ keeps them


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
        # Which task each row of the masks and prompts belongs to: checked against config.json when loading.
        self.register_buffer("task_name_crc32", task_name_crc32(config.task_names))
        self.transformer = HarmoDTTransformer(self.config)
        self.predict_action = nn.Linear(d, config.act_dim)
        self._assign_mask_init()
        for layer in self.masked_layers().values():  # the masks are buffers: drawn here, as init_weights would
            _init_layer_masks(layer)
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

    def num_masked_parameters(self) -> int:
        """Number of weights covered by task masks (per task)."""
        return sum(m.weight.numel() for m in self.masked_layers().values())

    def _assign_mask_init(self) -> None:
        """Give every masked layer its ERK density (global over the body, 1 − sparsity overall) and its own seed,
        so that each layer draws its task masks independently when it is initialised."""
        layers = self.masked_layers()
        shapes = {name: (m.out_features, m.in_features) for name, m in layers.items()}
        densities = erk_densities(shapes, 1.0 - float(self.config.sparsity)) if layers else {}
        for index, (name, layer) in enumerate(layers.items()):
            layer.mask_init = (densities[name], int(self.config.mask_seed) * 1_000_003 + index)

    def cache_masked_weights(self, enabled: bool = True) -> None:
        """Keep each task's masked weights ``W ⊙ M[t]`` between inference calls (no-grad forwards only; ≈ 19 MB per
        task in float32 at the paper size). Rebuilt when weights or masks change; dropped by
        ``cache_masked_weights(False)`` or by any forward with gradients."""
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
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` that refuses what would load wrong (see :mod:`.loading`): a folder
        without ``config.json``, a config whose task order, task count or ``mask_mode`` contradicts the weights, and
        non-finite weights. A checkpoint with no tensors at all loads as a new model (every key reported missing)."""
        wants_info = kwargs.pop("output_loading_info", False)
        source = check_pretrained_source(pretrained_model_name_or_path, kwargs)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except RuntimeError as error:
            if "mismatched" in str(error) or "packed_masks" in str(error):
                raise ValueError(
                    f"The tensors of {source} (task masks, stored prompts or weights) do not fit this configuration: "
                    "a different task count or model size. Load it with the config.json it was saved with."
                ) from error
            raise
        check_loaded_model(model, info, source)
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

    def add_task(self, name: str, *, prompt=None, state_mean, state_std, target_return=None, mask=None,
                 merge_threshold: int | None = None) -> int:  # fmt: skip
        """Append a task the model was not trained on; returns its task id (see :mod:`.new_tasks`).

        ``prompt``: its prompt, model-ready (``PROMPT_KEYS``, each ``(prompt_length, ...)``; required with prompts);
        ``state_mean``/``state_std``: its observation statistics; ``target_return``: default the trained tasks' mean;
        ``mask`` (masked models only): ``"merged"`` (default: the weights at least ``merge_threshold`` trained tasks
        keep, default half of them), ``"ones"`` or a trained task's name (its mask copied). Saved and loaded like the
        trained tasks, whose actions do not change."""
        return add_task(self, name, prompt=prompt, state_mean=state_mean, state_std=state_std,
                        target_return=target_return, mask=mask, merge_threshold=merge_threshold)  # fmt: skip

    def task_prompts(self, task_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored prompts for ``task_ids`` (a batch), ready to pass as ``prompt=``."""
        if not self.config.use_prompt:
            raise ValueError("This model does not use prompts (config.use_prompt=False)")
        if not bool(self.stored_prompt_attention_mask.any(dim=1).all()):
            raise ValueError(
                "This model has no stored prompt for some task: pass prompt=... (or prompt_states=...), or store one "
                "per task with model.set_task_prompts(...) first"
            )
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
        output_hidden_states: bool | None = None,
        last_action_only: bool = False,
        state_tokens_only: bool = False,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        prompt_states: torch.Tensor | None = None,
        prompt_actions: torch.Tensor | None = None,
        prompt_returns_to_go: torch.Tensor | None = None,
        prompt_timesteps: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
    ) -> HarmoDTOutput | tuple:
        """Predict the action at every state token.

        Args:
            states: ``(B, K, state_dim)`` normalised observations.
            actions: ``(B, K, act_dim)`` actions (the one at step t is hidden from the prediction at step t).
            returns_to_go: ``(B, K)`` or ``(B, K, 1)``, already divided by ``config.return_scale``.
            timesteps: ``(B, K)`` integer episode steps, ``< config.max_ep_len``.
            attention_mask: ``(B, K)``, 1 for real steps, 0 for padding (default all ones).
            task_ids: ``(B,)`` task indices into ``config.task_names``; required with masks or prompts.
            prompt_states, prompt_actions, prompt_returns_to_go, prompt_timesteps, prompt_attention_mask: the task
                prompt of each sample (P steps, shaped like the steps' inputs; the mask is optional). ``prompt=`` takes
                the same as a dict (keys ``states``, ``actions``, ...). Without either, and without
                ``prompt_key_values``, the model uses its stored prompts (:meth:`set_task_prompts`).
            prompt_key_values: the prompt already encoded by :meth:`encode_prompt` for these ``task_ids`` (the same
                actions as passing the prompt, computed without its tokens); ``last_hidden_state`` and
                ``hidden_states`` then hold the steps' tokens only.
            labels: target actions ``(B, K, act_dim)``; with ``return_loss=True`` and no labels, ``actions`` are the
                targets.
            output_hidden_states / output_attentions / return_dict: default to the config's.
            last_action_only: compute only what the last step's action needs (acting): ``action_preds`` is
                ``(B, 1, act_dim)``, the last row of a full forward up to float rounding. The last block finishes
                only the final two tokens, the last state and the action token after it (two, not one: on CPU a
                single-row matmul takes another kernel, whose rounding would make a sample's action depend on the
                batch size). Not with a loss, hidden states or attention weights.
            state_tokens_only: the last block finishes only the K state tokens, the ones ``action_preds`` reads
                (training: the same predictions and loss for less work; the trainer passes it). Not with hidden
                states, attention weights or ``last_action_only``.

        Shapes and dtypes are always checked; values (finite inputs, timestep and task id ranges) where that costs no
        device synchronisation: inputs on the CPU, and task ids of a masked model (read on the host to group the
        batch). On an accelerator the other values are checked where the data enters (the collator, the policy).
        """
        config = self.config
        return_dict = config.return_dict if return_dict is None else return_dict
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        returns_to_go = returns_to_go if returns_to_go.dim() == 3 else returns_to_go.unsqueeze(-1)
        size, length = states.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(size, length, dtype=torch.long, device=states.device)
        check_steps(self.config, states, actions, returns_to_go, timesteps, attention_mask)
        task_ids, batch = self._task_batch(task_ids, size, states.device)
        flat = dict(states=prompt_states, actions=prompt_actions, returns_to_go=prompt_returns_to_go,
                    timesteps=prompt_timesteps, attention_mask=prompt_attention_mask)  # fmt: skip
        prompt = self._resolve_prompt(prompt, flat, prompt_key_values, task_ids, size)
        if last_action_only and (labels is not None or return_loss or output_hidden_states or output_attentions):
            raise ValueError(
                "last_action_only=True computes the last step's action only: it cannot give a loss, hidden states or "
                "attention weights (drop labels/return_loss/output_hidden_states/output_attentions, or run a full "
                "forward)"
            )
        if state_tokens_only and (output_hidden_states or output_attentions or last_action_only):
            raise ValueError(
                "state_tokens_only=True finishes only the state tokens in the last block: it cannot give every hidden "
                "state or attention weight and does not combine with last_action_only"
            )
        labels = actions if labels is None and return_loss else labels

        tokens = self.embed_ln(self._embed(*(batch.sort(t) for t in (states, actions, returns_to_go, timesteps))))
        token_mask = batch.sort(attention_mask).repeat_interleave(3, dim=1)
        if prompt is not None:  # the prompt's tokens first
            prompt = {key: batch.sort(value) for key, value in prompt.items()}
            tokens = torch.cat([self._embed(*(prompt[k] for k in PROMPT_KEYS[:4]), prefix="prompt_"), tokens], dim=1)
            token_mask = torch.cat([prompt["attention_mask"].repeat_interleave(3, dim=1), token_mask], dim=1)
        past = None if prompt_key_values is None else batch.sort_prompt(prompt_key_values)
        final_rows = None
        if last_action_only:  # the last state token and the (unread) action token after it
            final_rows = slice(-2, None)
        elif state_tokens_only:  # (return, state, action) per step, after the prompt tokens if any
            final_rows = slice(tokens.shape[1] - 3 * length + 1, None, 3)
        hidden, all_hidden, attentions = self.transformer(
            tokens, token_mask, batch, past, None, final_rows, output_hidden_states, output_attentions
        )
        if last_action_only:  # the head on both rows, one two-row matmul per sample (see above); the state's kept
            head = self.predict_action
            action_preds = torch.tanh(torch.baddbmm(head.bias, hidden, head.weight.T.expand(size, -1, -1))[:, :1])
        elif state_tokens_only:
            action_preds = torch.tanh(self.predict_action(hidden))
        else:
            step_hidden = hidden[:, -3 * length :].reshape(size, length, 3, config.hidden_size)
            action_preds = torch.tanh(self.predict_action(step_hidden[:, :, 1]))

        loss = None
        if labels is not None:
            if labels.shape != action_preds.shape:
                raise ValueError(f"labels must have shape {tuple(action_preds.shape)}, got {tuple(labels.shape)}")
            valid = attention_mask.to(action_preds.dtype).unsqueeze(-1)
            squared = (action_preds - labels.to(action_preds.dtype)) ** 2 * valid
            loss = squared.sum() / (valid.sum().clamp_min(1.0) * config.act_dim)
        output = HarmoDTOutput(loss, action_preds, hidden, all_hidden, attentions)
        return output if return_dict else output.to_tuple()

    def encode_prompt(self, prompt: dict[str, torch.Tensor], task_ids: torch.Tensor) -> PromptKeyValues:
        """Every block's keys and values for the prompt tokens of a batch, to pass as ``prompt_key_values=``.

        ``prompt`` is as in :meth:`forward` (e.g. ``model.task_prompts(task_ids)``). The prompt precedes the steps
        and attention is causal, so the result does not depend on the steps: encode once per task and episode (the
        evaluation policy does) and reuse it at every step. Run it in the same precision (autocast) as the forwards.
        """
        if not self.config.use_prompt:
            raise ValueError("This model does not use prompts (config.use_prompt=False)")
        size = prompt["states"].shape[0]
        task_ids, batch = self._task_batch(task_ids, size, prompt["states"].device)
        prompt = {key: batch.sort(value) for key, value in check_prompt(self.config, prompt, size).items()}
        tokens = self._embed(*(prompt[key] for key in PROMPT_KEYS[:4]), prefix="prompt_")
        token_mask = prompt["attention_mask"].repeat_interleave(3, dim=1)
        key_values: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.transformer(tokens, token_mask, batch, kv_out=key_values)
        encoded = PromptKeyValues(tuple(key_values), token_mask, batch.sort(task_ids))
        return encoded if batch.inverse is None else encoded.select(batch.inverse)

    @torch.no_grad()
    def get_next_action(
        self, task, states, actions=None, rewards=None, target_return: float | None = None
    ) -> np.ndarray:
        """The action for the current step of one episode of ``task`` (a name or an index), from its history.

        Args:
            states: ``(T, state_dim)`` raw observations of the episode so far, the current one last.
            actions: ``(T - 1, act_dim)`` the actions taken after each earlier observation.
            rewards: ``(T - 1,)`` the reward received after each of those actions.
            target_return: the return to aim for (default ``config.target_returns`` of the task).

        Normalises the observations with the task's ``state_mean``/``state_std``, turns the rewards into
        returns-to-go, keeps the last ``context_length`` steps and acts with the stored task prompt, as
        :class:`~harmodt_hf.evaluation.HarmoDTPolicy` does for many episodes at once. Returns ``(act_dim,)``.
        """
        task = self.config.task_id(task) if isinstance(task, str) else int(task)
        param = self.embed_state.weight
        inputs = episode_inputs(self.config, task, states, actions, rewards, target_return)
        inputs = {
            key: value.to(param.device, param.dtype if value.is_floating_point() else None)
            for key, value in inputs.items()
        }
        with self.masked_weights_cached():
            output = self(**inputs, task_ids=torch.tensor([task], device=param.device), last_action_only=True)
        return output.action_preds[0, -1].float().cpu().numpy()

    # ----------------------------------------------------------------------------------------------- inputs
    def _embed(self, states, actions, returns_to_go, timesteps, prefix: str = "") -> torch.Tensor:
        """The (R, s, a) tokens of every step, interleaved: ``(B, 3 L, d)``; ``prefix="prompt_"``: the prompt's."""
        time = getattr(self, f"{prefix}embed_timestep")(timesteps)
        embed = {name: getattr(self, f"{prefix}embed_{name}") for name in ("return", "state", "action")}
        tokens = (embed["return"](returns_to_go) + time, embed["state"](states) + time, embed["action"](actions) + time)
        return torch.stack(tokens, dim=2).reshape(states.shape[0], 3 * states.shape[1], -1)

    def _task_batch(self, task_ids, size: int, device) -> tuple[torch.Tensor, TaskBatch]:
        """The checked ``(B,)`` task ids and the :class:`TaskBatch` the body runs (task groups only with masks)."""
        task_ids, host_ids = check_task_ids(self.config, task_ids, size, device)
        return task_ids, TaskBatch(host_ids if self.config.has_masks else None, device)

    def _resolve_prompt(self, prompt, flat: dict, prompt_key_values, task_ids, size: int):
        """The prompt tokens' inputs (``None`` when the prompt comes encoded, or without prompts)."""
        named = (("prompt", prompt), ("prompt_key_values", prompt_key_values), ("prompt_states, ...", *flat.values()))
        given = [name for name, *values in named if any(value is not None for value in values)]
        if not self.config.use_prompt:
            if given:
                raise ValueError(f"This model does not use prompts (config.use_prompt=False): pass no {given[0]}")
            return None
        if len(given) > 1:
            raise ValueError(f"pass the prompt once: got {' and '.join(given)}")
        if prompt_key_values is not None:
            check_prompt_key_values(self.config, prompt_key_values, task_ids)
            return None
        if prompt is None and given:
            prompt = flat
        return check_prompt(self.config, self.task_prompts(task_ids) if prompt is None else prompt, size)


HarmoDTConfig.register_for_auto_class()
HarmoDTModel.register_for_auto_class("AutoModel")
