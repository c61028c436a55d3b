"""HarmoDTTrainer: ``transformers.Trainer`` running HarmoDT's bi-level loop (weights inside, masks outside).

Inner step: Trainer's own step (forward, backward, clipping, AdamW, schedule) on a batch laid out by task; weights
that no task of the step uses are put back after the optimizer step, so weight decay and stale Adam moments never
move a task's masked-out weights.

Outer step (``mask_mode="harmony"``), after the optimizer step when ``global_step % mask_update_interval == 0``:
per-task gradients on fresh batches → agreement / importance scores → prune k active, regrow k inactive weights per
task (:mod:`.harmony`; the official numerics with ``update_rule="reference"``: :mod:`.reference_rule`). Gradients are
averaged over processes and the new masks are broadcast from process 0, so every process holds identical masks
(checked by hash after every update when several processes run).

Checkpoints also hold the run's setup, the masks' hash and the mask history (:mod:`.checkpoints`): a resume under
another setup, or from a checkpoint without its masks, is refused, and the mask history continues.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from harmodt_hf.cpu_features import warn_if_bf16_is_emulated
from harmodt_hf.model import masks as mask_math
from harmodt_hf.model.modeling_harmodt import HarmoDTModel
from harmodt_hf.training import checkpoints, harmony
from harmodt_hf.training.reference_rule import ReferenceRule
from harmodt_hf.training.segments import SegmentDataset, check_batch, collate_segments

logger = logging.get_logger(__name__)
SCORES = ("fisher", "magnitude", "random")


@dataclass
class HarmoDTTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the outer (mask) loop of HarmoDT.

    ``task_sampling``: ``"round_robin"`` trains one task per optimizer step and process, tasks in turn (the official
    schedule; each step moves only that task's active weights, so tasks take turns pulling the shared weights and
    Adam's moments mix tasks over time); ``"all_tasks"`` puts every task in every step (batch = tasks × segments per
    task; the gradient is the average over tasks — smoother, fewer steps per epoch of data, and the fast path on
    large hardware). With several processes a round-robin step holds one task per process.
    """

    mask_update_interval: int = field(default=500, metadata={"help": "t_m: optimizer steps between mask updates."})
    eta_min: float = field(default=0.0, metadata={"help": "Smallest number of weights pruned/regrown per task."})
    eta_max: float = field(
        default=100.0,
        metadata={"help": "Largest number of weights pruned/regrown per task and update (the official count)."},
    )
    eta_max_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Largest number of weights pruned/regrown per task and update as a fraction of a task's active "
            "weights (e.g. 0.01); replaces eta_max when set, so the dose scales with the model."
        },
    )
    eta_schedule: str = field(default="sine", metadata={"help": "'sine' (official bell 0→η_max→0) or 'cosine'."})
    eta_total_steps: int | None = field(default=None, metadata={"help": "T of the η schedule (default max_steps)."})
    gamma: float = field(default=10.0, metadata={"help": "Weight of the agreement term in the prune score."})
    score: str = field(
        default="fisher",
        metadata={
            "help": "Importance: 'fisher' (g²) or 'magnitude' (|θ|); 'random' prunes and regrows the same number of "
            "weights chosen at random (the churn control)."
        },
    )
    update_rule: str = field(default="harmony", metadata={"help": "'harmony' (intended) or 'reference' (official)."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace an earlier run in output_dir (training/train.py deletes its final model and checkpoints "
            "first); without it, training into a folder that holds a run is refused."
        },
    )
    task_sampling: str = field(default="round_robin", metadata={"help": "'round_robin' or 'all_tasks'."})
    mask_updates: bool = field(
        default=True,
        metadata={
            "help": "Run the outer mask loop (mask_mode='harmony'); false keeps every mask as it is (adapting a model "
            "to a new task without changing its mask)."
        },
    )
    mask_grad_batch_size: int = field(default=8, metadata={"help": "Segments per task for the mask gradients."})
    mask_grad_train_mode: bool | None = field(
        default=None,
        metadata={
            "help": "Mask gradients in train mode (dropout on) or eval mode. Default: eval mode for 'harmony' (each "
            "task's deterministic loss gradient; dropout would add noise to the scores and, on CPU, doubles the "
            "cost of the pass) and train mode for 'reference' (as the official code)."
        },
    )

    def __post_init__(self) -> None:
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False  # every parameter takes part in every step
        super().__post_init__()
        checks = {
            "mask_update_interval": self.mask_update_interval > 0,
            "eta_min": 0 <= self.eta_min <= self.eta_max,
            "eta_schedule": self.eta_schedule in ("sine", "cosine"),
            "gamma": self.gamma >= 0,
            "score": self.score in SCORES,
            "update_rule": self.update_rule in ("harmony", "reference"),
            "task_sampling": self.task_sampling in ("round_robin", "all_tasks"),
            "mask_grad_batch_size": self.mask_grad_batch_size > 0,
            "eta_total_steps": self.eta_total_steps is None or self.eta_total_steps > 0,
            "eta_max_fraction": self.eta_max_fraction is None or 0 < self.eta_max_fraction < 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"HarmoDTTrainingArguments.{name} has an invalid value: {getattr(self, name)!r}")


def eta_max_count(args: HarmoDTTrainingArguments, active_per_task: int) -> float:
    """η_max as a number of weights: ``eta_max_fraction`` × a task's active weights when set, else ``eta_max``."""
    if args.eta_max_fraction is not None:
        return int(args.eta_max_fraction * active_per_task)
    return args.eta_max


def task_masks_of(model: HarmoDTModel, tasks: list[int]) -> dict[str, torch.Tensor]:
    """The masks of the model's tasks ``tasks`` (``{name: bool (len(tasks), out, in)}``; all of them uncopied)."""
    masks = model.get_task_masks()
    if list(tasks) == list(range(model.config.num_tasks)):
        return masks
    return {name: mask[list(tasks)] for name, mask in masks.items()}


class HarmoDTTrainer(Trainer):
    """``Trainer`` for :class:`HarmoDTModel` on a :class:`SegmentDataset`, with the HarmoDT mask loop."""

    def __init__(self, model: HarmoDTModel, args: HarmoDTTrainingArguments, train_dataset: SegmentDataset, **kwargs):
        kwargs.setdefault("data_collator", collate_segments)
        self._validate_setup(model, args, train_dataset)
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        if self.args.bf16:
            warn_if_bf16_is_emulated(self.args.device, "Training", "Train without --bf16 (bf16=False) on this machine.")
        self._step_tasks = torch.zeros(model.config.num_tasks, dtype=torch.bool)
        self._frozen_snapshot: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mask_history: list[dict[str, Any]] = []
        # The official numerics (update_rule="reference") and the masks they keep beyond the model's.
        self.reference = ReferenceRule(model) if args.update_rule == "reference" else None
        self._pending_mask_log: dict[str, Any] = {}
        self.planned_share: float | None = None  # Σk / active weights of the whole schedule (set at train start)
        # The masks the run starts from: the share of each task's mask moved is measured against them.
        self.initial_masks = (
            {name: m.clone() for name, m in model.get_task_masks().items()} if model.config.has_masks else {}
        )
        self.add_callback(_MaskLoopCallback(self))

    def add_callback(self, callback) -> None:
        """Trainer's ``add_callback``; callbacks that log through the trainer (``bind_trainer``) are handed it."""
        super().add_callback(callback)
        for added in self.callback_handler.callbacks:
            if callable(getattr(added, "bind_trainer", None)):
                added.bind_trainer(self)

    # ------------------------------------------------------------------------------------------------ set-up
    @staticmethod
    def _validate_setup(model: HarmoDTModel, args: HarmoDTTrainingArguments, dataset: SegmentDataset) -> None:
        if not isinstance(args, HarmoDTTrainingArguments):
            raise TypeError("HarmoDTTrainer needs HarmoDTTrainingArguments")
        if not isinstance(dataset, SegmentDataset):
            raise TypeError("HarmoDTTrainer trains on a harmodt_hf.training.segments.SegmentDataset")
        config = model.config
        data_tasks = dataset.sampler.buffer.task_names
        missing = sorted(set(data_tasks) - set(config.task_names))
        if missing:
            raise ValueError(
                f"Dataset tasks {data_tasks} do not match the model's tasks {config.task_names} (missing from the "
                f"config: {missing})"
            )
        sampler_config = dataset.sampler.config
        for name in ("task_names", "state_mean", "state_std", "return_scale", "context_length", "prompt_length"):
            if getattr(sampler_config, name) != getattr(config, name):
                raise ValueError(
                    f"The segments are cut with another config than the model's ({name} differs): build the "
                    "SegmentSampler with model.config"
                )
        if len(data_tasks) < config.num_tasks:
            if args.update_rule == "reference":
                raise ValueError("update_rule='reference' updates every task's mask: train on all the model's tasks")
            untrained = [name for name in config.task_names if name not in data_tasks]
            logger.warning(
                f"Training on {len(data_tasks)} of the model's {config.num_tasks} tasks ({data_tasks}): the masks of "
                f"the others ({untrained}) stay as they are; weights they share with the trained tasks still change "
                "unless they are frozen."
            )
        if dataset.task_sampling != args.task_sampling:
            raise ValueError(
                f"The dataset samples tasks by {dataset.task_sampling!r} but args.task_sampling is "
                f"{args.task_sampling!r}"
            )
        if dataset.batch_size != args.per_device_train_batch_size:
            raise ValueError("SegmentDataset.batch_size must equal args.per_device_train_batch_size")
        if args.task_sampling == "all_tasks" and args.per_device_train_batch_size % len(data_tasks):
            raise ValueError(
                f"task_sampling='all_tasks' needs per_device_train_batch_size to be a multiple of the number of "
                f"tasks ({len(data_tasks)}), got {args.per_device_train_batch_size}"
            )
        if config.mask_mode == "harmony" and args.mask_updates:
            if args.update_rule == "reference" and args.score == "random":
                raise ValueError("score='random' (the churn control) works with update_rule='harmony' only")
            if args.eta_total_steps is not None and 0 < args.max_steps and args.eta_total_steps < args.max_steps:
                raise ValueError(
                    f"eta_total_steps={args.eta_total_steps} is shorter than max_steps={args.max_steps}: the η "
                    "schedule would end before training does. Set eta_total_steps >= max_steps (or leave it unset)."
                )
            total = model.num_masked_parameters()
            active = mask_math.mask_density(task_masks_of(model, dataset.model_task_ids)) * total
            fewest = int(min(active.min().item(), total - active.max().item()))
            eta_max = eta_max_count(args, int(active.min().item()))
            if eta_max > fewest:
                raise ValueError(
                    f"eta_max={eta_max} is larger than a task's active or inactive weight count ({fewest}): "
                    "lower eta_max (or eta_max_fraction) or the sparsity"
                )

    def _get_train_sampler(self, train_dataset=None):
        """Items are random by construction (seeded by index), so the sampler keeps them in order: this keeps the
        round-robin task schedule and makes resuming exact."""
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        check_batch(inputs)
        self._step_tasks[inputs["task_ids"].unique().cpu()] = True
        # The loss reads the state tokens only: the last block need not finish the others (same loss, less work).
        return super().training_step(model, {**inputs, "state_tokens_only": True}, num_items_in_batch)

    @property
    def harmodt(self) -> HarmoDTModel:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------------------------------------ inner step
    def _tasks_in_step(self) -> torch.Tensor:
        tasks = self._step_tasks.clone()
        if self.accelerator.num_processes > 1:
            tasks = self.accelerator.reduce(tasks.to(self.accelerator.device, torch.float32), "sum").cpu() > 0
        return tasks

    def snapshot_unused_weights(self) -> None:
        """Before the optimizer step: remember the masked weights that no task of this step uses."""
        self._frozen_snapshot = {}
        model = self.harmodt
        if not model.config.has_masks:
            return
        tasks = self._tasks_in_step().nonzero().flatten().tolist()
        self._step_tasks.zero_()
        for name, layer in model.masked_layers().items():
            if not layer.weight.requires_grad:  # frozen (e.g. prompt adaptation): the optimizer never moves it
                continue
            masks = layer.task_masks()
            used = masks[tasks[0]] if len(tasks) == 1 else masks[tasks].any(dim=0)
            if bool(used.view(torch.uint8).amin()):  # every weight used (uint8 reductions are fast on CPU)
                continue
            unused = (~used).view(torch.uint8).to(layer.weight.dtype)
            self._frozen_snapshot[name] = (unused, layer.weight.detach().clone())

    @torch.no_grad()
    def restore_unused_weights(self) -> None:
        """After the optimizer step: put the snapshotted weights back (``lerp`` with 0/1 weights is exact)."""
        layers = self.harmodt.masked_layers()
        for name, (unused, before) in self._frozen_snapshot.items():
            weight = layers[name].weight.data
            torch.lerp(weight, before, unused, out=weight)
        self._frozen_snapshot = {}

    # ------------------------------------------------------------------------------------------------ outer step
    def _task_loss(self, task: int, tag: int, model: HarmoDTModel | None = None) -> torch.Tensor:
        """Task ``task``'s masked action MSE on ``mask_grad_batch_size`` fresh segments, seeded by (seed, step,
        process, tag, task), in the training precision (through ``model``, default the trained model)."""
        model, args = model or self.harmodt, self.args
        seed = (args.seed, 7919, self.state.global_step, self.accelerator.process_index, tag, task)
        segments = self.train_dataset.task_batch(task, args.mask_grad_batch_size, seed)
        batch = self._prepare_inputs(collate_segments(segments))
        labels = batch.pop("labels")
        with self.accelerator.autocast():
            preds = model(**batch, state_tokens_only=True).action_preds.float()
        valid = batch["attention_mask"].to(preds.dtype).unsqueeze(-1)
        return ((preds - labels) ** 2 * valid).sum() / (valid.sum() * model.config.act_dim).clamp_min(1.0)

    # ------------------------------------------------------------------------------------------------ dose
    def active_weights_per_task(self) -> int:
        """The fewest active (kept) masked weights of any task trained (ERK keeps the same count in every task)."""
        masks = task_masks_of(self.harmodt, self.train_dataset.model_task_ids)
        return int((mask_math.mask_density(masks) * self.harmodt.num_masked_parameters()).min().item())

    def prune_count_at(self, step: int) -> int:
        """k, the weights pruned and regrown per task by the update after optimizer step ``step`` (1-based).

        The η bell is indexed by the 0-based iteration as in the official ``main.py`` (α = iter / max_iters with the
        update after iteration ``iter``): the update after step ``s`` uses ``t = s - 1``."""
        args = self.args
        total = args.eta_total_steps or self.state.max_steps or args.max_steps
        eta_max = eta_max_count(args, self.active_weights_per_task())
        return harmony.prune_count(step - 1, total, args.eta_min, eta_max, args.eta_schedule)

    def planned_moved_fraction(self, max_steps: int | None = None) -> float:
        """Σk over every mask update of the run divided by a task's active weights: the share of each task's mask
        the whole schedule moves (if no weight moved twice)."""
        max_steps = max_steps or self.state.max_steps or self.args.max_steps
        interval = self.args.mask_update_interval
        planned = sum(self.prune_count_at(step) for step in range(interval, max_steps + 1, interval))
        return planned / self.active_weights_per_task()

    def moved_fraction(self) -> torch.Tensor:
        """Per task, the share of its initially active weights that are inactive now, ``(num_tasks,)`` float64
        (``|M_0 ∧ ¬M| / |M_0|``; each pruned weight is paired with a regrown one, so half the bits changed)."""
        masks = self.harmodt.get_task_masks()
        num_tasks = self.harmodt.config.num_tasks
        left = sum((m0 & ~masks[n]).reshape(num_tasks, -1).sum(dim=1) for n, m0 in self.initial_masks.items())
        kept = sum(m0.reshape(num_tasks, -1).sum(dim=1) for m0 in self.initial_masks.values())
        return left.double() / kept.double()

    def update_masks(self) -> dict[str, Any]:
        """One outer step: prune and regrow k weights of every task's mask; returns (and logs) its statistics.

        Rule ``"harmony"``: Algorithm 1 as :mod:`.harmony` states it (or its churn control, ``score="random"``); rule
        ``"reference"``: the official code's numerics (:mod:`.reference_rule`). Task gradients are averaged over
        processes, process 0 selects and the new masks are broadcast to every process."""
        k = self.prune_count_at(self.state.global_step)
        if self.reference is not None:  # the only branch on the rule
            new_masks, stats, losses = self._reference_update(k)
        else:
            new_masks, stats, losses = self._harmony_update(k)
        if new_masks is not None:
            self.harmodt.set_task_masks(new_masks, copy=False)  # fresh tensors of the selection, handed over
        self._broadcast_masks()
        record = self._mask_log(k, stats, losses)
        self.mask_history.append({"step": self.state.global_step, "hash": self.mask_hash(), **record})
        return record

    def _harmony_update(self, k: int) -> tuple[dict | None, dict, torch.Tensor]:
        """Algorithm 1: task gradients (eval mode unless ``mask_grad_train_mode``), clipped, then scores, prune and
        regrow; the churn control draws its choices instead. New masks on process 0 only (``None`` elsewhere)."""
        model, args = self.harmodt, self.args
        tasks = self.train_dataset.model_task_ids  # every task of the model, or the ones this run trains
        all_masks, masks = model.get_task_masks(), task_masks_of(model, tasks)
        if args.score == "random":  # the churn control reads no gradient
            new_masks, stats = None, {}
            if self.accelerator.is_main_process:
                new_masks, stats = harmony.random_mask_update(masks, k, self._churn_generator())
            return self._all_task_masks(all_masks, tasks, new_masks), stats, torch.full((len(tasks),), math.nan)
        with self._mask_gradient_mode(train=False):
            grads, losses = harmony.task_gradients(model, lambda task: self._task_loss(task, tag=0), tasks)
        grads, losses = self._mean_over_processes(grads, losses)
        if not self.accelerator.is_main_process:
            return None, {}, losses
        with torch.no_grad():
            harmony.clip_task_gradients(grads, args.max_grad_norm)
            params = {name: model.get_parameter(name) for name in masks}
            new_masks, stats = harmony.harmony_mask_update(masks, grads, params, k, args.gamma, args.score)
        return self._all_task_masks(all_masks, tasks, new_masks), stats, losses

    @staticmethod
    def _all_task_masks(all_masks: dict, tasks: list[int], new_masks: dict | None) -> dict | None:
        """Every task's masks after an update of the masks of ``tasks`` only (the others as they were)."""
        if new_masks is None or len(tasks) == next(iter(all_masks.values())).shape[0]:
            return new_masks
        merged = {name: mask.clone() for name, mask in all_masks.items()}
        for name, rows in new_masks.items():
            merged[name][tasks] = rows
        return merged

    def _reference_update(self, k: int) -> tuple[dict | None, dict, torch.Tensor]:
        """The official numerics: task gradients in train mode (unless ``mask_grad_train_mode``), clipped dense and
        masked, then the official selection over every parameter. New masks on process 0 only."""
        with self._mask_gradient_mode(train=True):
            task_loss = lambda task: self._task_loss(task, tag=1)  # noqa: E731
            grads, losses = self.reference.task_gradients(task_loss, self.args.max_grad_norm)
        grads, losses = self._mean_over_processes(grads, losses)
        if not self.accelerator.is_main_process:
            return None, {}, losses
        with torch.no_grad():
            new_masks, stats = self.reference.update(grads, k, self.args.gamma, self.args.score)
        return new_masks, stats, losses

    @contextlib.contextmanager
    def _mask_gradient_mode(self, train: bool):
        """The model in train mode (dropout on) or eval mode for the task gradients: ``train`` by default,
        ``mask_grad_train_mode`` when set; back to its mode afterwards."""
        model = self.harmodt
        was_training = model.training
        model.train(train if self.args.mask_grad_train_mode is None else self.args.mask_grad_train_mode)
        try:
            yield
        finally:
            model.train(was_training)

    def _mean_over_processes(self, grads: dict, losses: torch.Tensor) -> tuple[dict, torch.Tensor]:
        if self.accelerator.num_processes == 1:
            return grads, losses
        grads = {name: self.accelerator.reduce(g, "mean") for name, g in grads.items()}
        return grads, self.accelerator.reduce(losses.to(self.accelerator.device), "mean").cpu()

    def _churn_generator(self) -> torch.Generator:
        """The random choices of the churn control: seeded by (seed, step), so a run is reproducible and resumable."""
        return torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Trainer's log, with the last mask update's statistics merged into the log of the same step."""
        if self._pending_mask_log:
            logs = {**logs, **self._pending_mask_log}
            self._pending_mask_log = {}
        super().log(logs, *args, **kwargs)

    def _broadcast_masks(self) -> None:
        if self.accelerator.num_processes == 1:
            return
        from accelerate.utils import broadcast

        for layer in self.harmodt.masked_layers().values():
            packed = broadcast(layer.packed_masks.to(self.accelerator.device), from_process=0)
            layer.packed_masks.copy_(packed.to(layer.packed_masks.device))
        digest = torch.tensor([int(self.mask_hash()[:15], 16)], device=self.accelerator.device)
        gathered = self.accelerator.gather(digest)
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError(f"Task masks differ between processes after the mask update: {gathered.tolist()}")

    def mask_hash(self) -> str:
        """SHA-256 of all packed task masks (identical on every process after each update)."""
        digest = hashlib.sha256()
        for name, layer in sorted(self.harmodt.masked_layers().items()):
            digest.update(name.encode())
            digest.update(layer.packed_masks.cpu().numpy().tobytes())
        return digest.hexdigest()

    def _mask_log(self, k: int, stats: dict, losses: torch.Tensor) -> dict[str, Any]:
        model = self.harmodt
        task_masks = model.get_task_masks()
        density = mask_math.mask_density(task_masks)
        iou = mask_math.pairwise_iou(task_masks)
        num_tasks = model.config.num_tasks
        off_diagonal = iou[~torch.eye(num_tasks, dtype=torch.bool)]
        moved = self.moved_fraction()
        record: dict[str, Any] = {
            "mask/k": k,
            "mask/pruned": int(stats["pruned"].sum()) if "pruned" in stats else 0,
            "mask/regrown": int(stats["regrown"].sum()) if "regrown" in stats else 0,
            "mask/mean_density": float(density.mean()),
            "mask/mean_pairwise_iou": float(off_diagonal.mean()) if num_tasks > 1 else 1.0,
            "mask/moved_fraction": float(moved.mean()),
        }
        task_losses = dict(zip(self.train_dataset.model_task_ids, losses.tolist(), strict=True))
        for t, name in enumerate(model.config.task_names):
            record[f"mask/density/{name}"] = float(density[t])
            record[f"mask/moved/{name}"] = float(moved[t])
            if t in task_losses:  # the tasks this run trains
                record[f"mask/loss/{name}"] = task_losses[t]
        return record

    # ------------------------------------------------------------------------------------------------ checkpoints
    def run_setup(self) -> dict[str, Any]:
        """What identifies this run's setup (task order, variant, model size, mask rule); checked on resume."""
        return checkpoints.run_setup(self.harmodt.config, self.args.update_rule, self.args.score)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            checkpoints.write_run_file(folder, self.run_setup(), self.mask_hash(), self.mask_history)
            if self.reference is not None:
                self.reference.save(folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Trainer's loading, after checking that the checkpoint is this run's (setup, masks present) and followed
        by restoring the mask history and checking the loaded masks' hash."""
        folder = resume_from_checkpoint
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"--resume_from_checkpoint {folder} is not a checkpoint folder of a run (no config.json)")
        run = checkpoints.read_run_file(folder)
        if run is None:
            logger.warning(
                f"{folder} has no {checkpoints.RUN_FILE} (written by an older harmodt-hf): its setup is checked from "
                "config.json only, and the mask history starts afresh from this checkpoint"
            )
            config = type(self.harmodt.config).from_json_file(os.path.join(folder, "config.json"))
            saved = checkpoints.run_setup(config, self.args.update_rule, self.args.score)
        else:
            saved = run["setup"]
        checkpoints.check_same_setup(folder, saved, self.run_setup())
        mask_keys = [key for key in self.harmodt.state_dict() if key.endswith("packed_masks")]
        checkpoints.check_masks_present(folder, mask_keys)
        super()._load_from_checkpoint(folder, model)
        if run is not None:
            checkpoints.check_mask_hash(folder, run["mask_hash"], self.mask_hash())
            self.mask_history = list(run["mask_history"])
        if self.reference is not None:
            self.reference.load(folder, expected=bool(self.mask_history))


class _MaskLoopCallback(TrainerCallback):
    """Connects the trainer's mask loop to the optimizer step and the step end."""

    def __init__(self, trainer: HarmoDTTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.harmodt.config.mask_mode == "harmony" and args.mask_updates:
            trainer.planned_share = trainer.planned_moved_fraction(state.max_steps)
            logger.warning(
                "Mask schedule: %d updates (every %d steps, η_max = %s weights per task), Σk moves %.2f%% of each "
                "task's %d active weights",
                state.max_steps // args.mask_update_interval,
                args.mask_update_interval,
                eta_max_count(args, trainer.active_weights_per_task()),
                100 * trainer.planned_share,
                trainer.active_weights_per_task(),
            )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.snapshot_unused_weights()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.restore_unused_weights()

    def on_step_end(self, args, state, control, **kwargs):
        config = self.trainer.harmodt.config
        if config.mask_mode == "harmony" and args.mask_updates and state.global_step % args.mask_update_interval == 0:
            record = self.trainer.update_masks()
            if control.should_log:  # Trainer logs the loss right after this callback: join that log
                self.trainer._pending_mask_log = record
            else:
                self.trainer.log(record)
