"""HarmoDTConfig: everything needed to build a HarmoDT policy and act with it."""

from __future__ import annotations

import math
from collections.abc import Sequence

from transformers import PretrainedConfig

MASK_MODES = ("harmony", "random", "none")
ACTIVATIONS = ("relu", "gelu", "gelu_new", "tanh", "silu")


class HarmoDTConfig(PretrainedConfig):
    """Configuration of a :class:`HarmoDTModel` (a Prompt-DT GPT-2 body seen through one binary mask per task).

    Args:
        state_dim: observation size (39 for goal-observable Meta-World).
        act_dim: action size (4 for Meta-World).
        hidden_size: width ``d`` of the transformer.
        n_layer: number of transformer blocks.
        n_head: attention heads; must divide ``hidden_size``.
        n_inner: MLP inner width (defaults to ``4 * hidden_size``).
        activation_function: MLP activation (``"relu"`` as in the official code).
        resid_pdrop / attn_pdrop / embd_pdrop: dropout rates.
        layer_norm_epsilon: LayerNorm epsilon.
        initializer_range: std of the N(0, σ) init of the transformer body.
        max_ep_len: number of timestep embeddings; timesteps must be ``< max_ep_len``.
        context_length: K, the number of steps the policy sees (read by the policy, the trainer's segments and
            :meth:`HarmoDTModel.get_next_action`; the model itself takes sequences of any length).
        prompt_length: number of steps in the task prompt (Prompt-DT).
        task_names: ordered task names; the task id of a task is its index here. The order is saved with the weights
            (``from_pretrained`` refuses a ``config.json`` that lists them in another order).
        mask_mode: ``"harmony"`` (HarmoDT, masks updated in training), ``"random"`` (HarmoDT-R, fixed ERK masks) or
            ``"none"`` (no masks: MTDT, or Prompt-DT with ``use_prompt``).
        sparsity: fraction of masked weights switched off per task (S; density is ``1 - S``).
        mask_seed: seed of the ERK mask initialisation.
        use_prompt: prepend a task prompt (Prompt-DT style).
        return_scale: returns-to-go are divided by this before entering the model.
        target_returns: per-task target return (unscaled) used when acting; defaults to 4500 for every task.
        state_mean / state_std: per-task observation mean and std (lists of ``state_dim`` floats per task) used to
            normalise observations; default 0 / 1.

    ``context_length``, ``target_returns``, ``state_mean`` and ``state_std`` are not read by ``forward`` (it takes
    normalised states and scaled returns-to-go): they travel with the model for acting (the policy,
    :meth:`HarmoDTModel.get_next_action`) and for training. ``num_attention_heads`` and ``num_hidden_layers`` are the
    transformers names of ``n_head`` and ``n_layer``.
    """

    model_type = "harmodt"
    attribute_map = {"num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}

    def __init__(
        self,
        state_dim: int = 39,
        act_dim: int = 4,
        hidden_size: int = 256,
        n_layer: int = 6,
        n_head: int = 8,
        n_inner: int | None = 1024,
        activation_function: str = "relu",
        resid_pdrop: float = 0.1,
        attn_pdrop: float = 0.1,
        embd_pdrop: float = 0.1,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        max_ep_len: int = 1000,
        context_length: int = 20,
        prompt_length: int = 5,
        task_names: Sequence[str] | None = None,
        mask_mode: str = "harmony",
        sparsity: float = 0.2,
        mask_seed: int = 0,
        use_prompt: bool = True,
        return_scale: float = 1000.0,
        target_returns: Sequence[float] | None = None,
        state_mean: Sequence[Sequence[float]] | None = None,
        state_std: Sequence[Sequence[float]] | None = None,
        **kwargs,
    ) -> None:
        self.state_dim = state_dim
        self.act_dim = act_dim
        self.hidden_size = hidden_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_inner = n_inner if n_inner is not None else 4 * hidden_size
        self.activation_function = activation_function
        self.resid_pdrop = resid_pdrop
        self.attn_pdrop = attn_pdrop
        self.embd_pdrop = embd_pdrop
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.max_ep_len = max_ep_len
        self.context_length = context_length
        self.prompt_length = prompt_length
        self.task_names = list(task_names) if task_names is not None else ["task-0"]
        self.mask_mode = mask_mode
        self.sparsity = sparsity
        self.mask_seed = mask_seed
        self.use_prompt = use_prompt
        self.return_scale = return_scale
        num_tasks = len(self.task_names)
        self.target_returns = [float(r) for r in target_returns] if target_returns is not None else [4500.0] * num_tasks
        self.state_mean = (
            [[float(v) for v in row] for row in state_mean]
            if state_mean is not None
            else [[0.0] * state_dim for _ in range(num_tasks)]
        )
        self.state_std = (
            [[float(v) for v in row] for row in state_std]
            if state_std is not None
            else [[1.0] * state_dim for _ in range(num_tasks)]
        )
        super().__init__(**kwargs)
        self.validate_harmodt()

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def task_id(self, task_name: str) -> int:
        """Index of ``task_name``; a clear error lists the model's tasks when it is not one of them."""
        try:
            return self.task_names.index(task_name)
        except ValueError:
            raise ValueError(
                f"Task {task_name!r} is not one of this model's {self.num_tasks} tasks: {self.task_names}"
            ) from None

    def validate_harmodt(self) -> None:
        """Check every field; raise ``ValueError`` naming the offending field."""
        for field in (
            "state_dim",
            "act_dim",
            "hidden_size",
            "n_layer",
            "n_head",
            "n_inner",
            "max_ep_len",
            "context_length",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"HarmoDTConfig.{field} must be a positive integer, got {value!r}")
        if not isinstance(self.prompt_length, int) or self.prompt_length < 0:
            raise ValueError(f"HarmoDTConfig.prompt_length must be a non-negative integer, got {self.prompt_length!r}")
        if self.use_prompt and self.prompt_length == 0:
            raise ValueError("HarmoDTConfig.prompt_length must be > 0 when use_prompt=True")
        if self.hidden_size % self.n_head:
            raise ValueError(f"HarmoDTConfig.n_head ({self.n_head}) must divide hidden_size ({self.hidden_size})")
        for field in ("resid_pdrop", "attn_pdrop", "embd_pdrop"):
            value = getattr(self, field)
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"HarmoDTConfig.{field} must be in [0, 1), got {value!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"HarmoDTConfig.activation_function must be one of {ACTIVATIONS}, got {self.activation_function!r}"
            )
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"HarmoDTConfig.mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"HarmoDTConfig.sparsity must be in [0, 1), got {self.sparsity!r}")
        if not (isinstance(self.return_scale, (int, float)) and self.return_scale > 0):
            raise ValueError(f"HarmoDTConfig.return_scale must be a positive number, got {self.return_scale!r}")
        if not self.task_names or not all(isinstance(t, str) and t for t in self.task_names):
            raise ValueError(f"HarmoDTConfig.task_names must be a non-empty list of names, got {self.task_names!r}")
        if len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"HarmoDTConfig.task_names has duplicates: {self.task_names}")
        num_tasks = self.num_tasks
        if len(self.target_returns) != num_tasks:
            raise ValueError(
                f"HarmoDTConfig.target_returns has {len(self.target_returns)} entries for {num_tasks} tasks"
            )
        for field in ("state_mean", "state_std"):
            rows = getattr(self, field)
            if len(rows) != num_tasks:
                raise ValueError(f"HarmoDTConfig.{field} has {len(rows)} rows for {num_tasks} tasks")
            if any(len(row) != self.state_dim for row in rows):
                raise ValueError(f"HarmoDTConfig.{field}: every row must have state_dim={self.state_dim} values")
            if any(not math.isfinite(v) for row in rows for v in row):
                raise ValueError(f"HarmoDTConfig.{field} holds a non-finite value")
        if any(v < 0 for row in self.state_std for v in row):
            raise ValueError("HarmoDTConfig.state_std must be non-negative")

    @property
    def has_masks(self) -> bool:
        return self.mask_mode != "none"
