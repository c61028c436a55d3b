"""Few-shot adaptation: fine-tune a trained model on a few demonstrations of tasks added after training.

The tasks are added first (``model.add_task``, e.g. by :func:`.demonstrations.add_task_from_demonstrations`); then
:func:`adapt` trains on their episodes with :class:`~.trainer.HarmoDTTrainer` — only the new tasks in the batches — in
one of three modes (``train=``):

* ``"prompt"`` (default): **prompt tuning**. The new tasks' stored prompt values (states, actions, returns-to-go) are
  the only trainable values; every weight is frozen, the other tasks' prompt rows are put back after every optimizer
  step. Nothing a trained task computes with changes, so **their actions stay the same bit for bit**.
* ``"embeddings"``: the new tasks' prompts plus every weight outside the masked body — the token and prompt
  embeddings, their LayerNorm and the action head. These are shared by all tasks: **the trained tasks' actions
  change**.
* ``"all"``: every weight, as in training, on the new tasks' episodes (a prompt per segment from the demonstrations,
  the training rule). The body's weights move only where a new task's mask keeps them (the trainer puts the others
  back), but a merged mask keeps what at least half of the trained tasks keep, and the biases, LayerNorms,
  embeddings and head are shared: **the trained tasks' actions change** wherever masks overlap.

With ``mask_updates=True`` (a ``mask_mode="harmony"`` model) the outer loop also updates the new tasks' masks, and
theirs only: with only the new tasks' data, the agreement term compares each new task with the new tasks' mean
gradient (one new task: with itself), so a lone task prunes the kept weights of smallest gradient and regrows the
dropped weights of largest gradient. The trained tasks' masks are never touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import TrainerCallback

from harmodt_hf.model.modeling_harmodt import HarmoDTModel
from harmodt_hf.training.demonstrations import TaskDemonstrations
from harmodt_hf.training.segments import EpisodeBuffer, SegmentDataset, SegmentSampler
from harmodt_hf.training.trainer import HarmoDTTrainer, HarmoDTTrainingArguments

ADAPT_MODES = ("prompt", "embeddings", "all")
TRAINED_PROMPT_KEYS = ("states", "actions", "returns_to_go")  # the prompt's values (timesteps and mask stay)

__all__ = ["ADAPT_MODES", "AdaptationArguments", "adapt", "trainable_prompts"]


@dataclass
class AdaptationArguments:
    """Adapting a trained model to new tasks (``training/train.py`` with ``adapt_from``;
    ``harmodt_hf/configs/adapt.yaml``)."""

    adapt_from: str = field(default="", metadata={"help": "Trained model folder or Hub repo to adapt."})
    adapt_tasks: list[str] | None = field(default=None, metadata={"help": "The new tasks (not in the model)."})
    dataset: str = field(default="", metadata={"help": "Dataset folder or Hub repo with the demonstrations."})
    demos_config: str | None = field(
        default=None, metadata={"help": "Dataset config of the demonstrations (default <task>-near-optimal)."}
    )
    demo_episodes: int | None = field(
        default=None, metadata={"help": "Use the last N episodes of each new task (default all)."}
    )
    adapt_train: str = field(default="prompt", metadata={"help": f"What adaptation trains: one of {ADAPT_MODES}."})
    new_task_mask: str | None = field(
        default=None,
        metadata={"help": "Mask of a new task: 'merged' (default on masked models), 'ones' or a trained task's name."},
    )
    merge_threshold: int | None = field(
        default=None, metadata={"help": "Merged mask: trained tasks that must keep a weight (default half)."}
    )
    std_floor: float = field(
        default=1.0, metadata={"help": "A new task's state std is at least this x the trained tasks' mean std."}
    )

    def __post_init__(self) -> None:
        if self.adapt_train not in ADAPT_MODES:
            raise ValueError(f"adapt_train must be one of {ADAPT_MODES}, got {self.adapt_train!r}")


def _trainable(name: str, train: str) -> bool:
    """Whether adaptation mode ``train`` trains the parameter ``name`` (prompt parameters aside)."""
    if train == "all":
        return True
    if train == "embeddings":
        return not name.startswith("transformer.")
    return False


class _PutOtherPromptRowsBack(TrainerCallback):
    """After every optimizer step, the rows of the tasks not adapted go back to their values (weight decay and Adam
    would move them otherwise: the prompt parameters hold every task's row)."""

    def __init__(self, parameters: Sequence[nn.Parameter], adapted: Sequence[int]) -> None:
        self.parameters = list(parameters)
        rows = torch.ones(self.parameters[0].shape[0], dtype=torch.bool)
        rows[list(adapted)] = False
        self.other_rows = rows.nonzero().flatten()
        self.saved = [p.detach()[self.other_rows].clone() for p in self.parameters]

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, **kwargs):
        for parameter, saved in zip(self.parameters, self.saved, strict=True):
            parameter.index_copy_(0, self.other_rows.to(parameter.device), saved.to(parameter.device))


@contextmanager
def trainable_prompts(model: HarmoDTModel):
    """Within the block, the stored prompt values (``stored_prompt_states``, ``_actions``, ``_returns_to_go``) are
    parameters (trainable, saved under the same names); afterwards buffers again, holding the trained values."""
    if not model.config.use_prompt:
        raise ValueError("This model does not use prompts (config.use_prompt=False): there is no prompt to tune")
    names = [f"stored_prompt_{key}" for key in TRAINED_PROMPT_KEYS]
    for name in names:
        value = getattr(model, name).detach().clone()
        delattr(model, name)
        model.register_parameter(name, nn.Parameter(value))
    try:
        yield [getattr(model, name) for name in names]
    finally:
        for name in names:
            value = getattr(model, name).detach()
            delattr(model, name)
            model.register_buffer(name, value)


def adapt(
    model: HarmoDTModel,
    demonstrations: Sequence[TaskDemonstrations],
    args: HarmoDTTrainingArguments,
    train: str = "prompt",
    callbacks: Sequence[TrainerCallback] = (),
) -> HarmoDTTrainer:
    """Fine-tune ``model`` on the demonstrations of tasks already added to it (see the module docstring for
    ``train``); returns the trainer (its ``state.log_history`` holds the losses). ``args.max_steps`` optimizer steps,
    batches of ``args.per_device_train_batch_size`` segments of the new tasks only; with several new tasks,
    ``args.task_sampling`` decides how they share a batch. The model keeps its train/eval mode and ``requires_grad``
    flags."""
    if train not in ADAPT_MODES:
        raise ValueError(f"train must be one of {ADAPT_MODES}, got {train!r}")
    config = model.config
    if not demonstrations:
        raise ValueError("adapt needs the demonstrations of at least one new task")
    unknown = [d.task_name for d in demonstrations if d.task_name not in config.task_names]
    if unknown:
        raise ValueError(
            f"Add the task(s) {unknown} to the model first (model.add_task, or add_task_from_demonstrations)"
        )
    if train == "prompt" and not config.use_prompt:
        raise ValueError(
            "train='prompt' tunes the new tasks' prompts, but this model has none: use 'embeddings' or 'all'"
        )
    if args.max_steps is None or args.max_steps <= 0:
        raise ValueError("args.max_steps must be set (> 0): adaptation trains for a number of steps")
    ordered = sorted(demonstrations, key=lambda d: config.task_id(d.task_name))
    buffer = EpisodeBuffer({d.task_name: d.episodes for d in ordered}, [d.task_name for d in ordered])
    sampler = SegmentSampler(buffer, config, with_prompts=config.use_prompt and train == "all")
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    dataset = SegmentDataset(
        sampler, args.max_steps * per_step, args.per_device_train_batch_size, args.task_sampling, args.seed
    )
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    tuned = trainable_prompts(model) if config.use_prompt and train != "all" else nullcontext(None)
    try:
        with tuned as prompt_parameters:
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(name not in flags or _trainable(name, train))
            extra = list(callbacks)
            if prompt_parameters is not None:
                extra.append(_PutOtherPromptRowsBack(prompt_parameters, sampler.model_task_ids))
            trainer = HarmoDTTrainer(model=model, args=args, train_dataset=dataset, callbacks=extra)
            trainer.train()
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags.get(name, True))
        model.train(was_training)
    return trainer


def final_loss(trainer: HarmoDTTrainer) -> float:
    """The last logged training loss of a run (else the run's mean ``train_loss``; NaN when neither was logged)."""
    for key in ("loss", "train_loss"):
        value = next((h[key] for h in reversed(trainer.state.log_history) if key in h), None)
        if value is not None:
            return float(value)
    return math.nan
