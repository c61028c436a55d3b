"""SuccessRateCallback: Meta-World success rate during ``Trainer`` training, with the last and best evaluations."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from harmodt_hf.evaluation.policy import check_precision
from harmodt_hf.evaluation.rollouts import evaluate

logger = logging.getLogger(__name__)

HISTORY_FILE = "eval_history.json"


def _unwrap(model):
    """The bare model under DDP/FSDP/compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


class SuccessRateCallback(TrainerCallback, ExportableState):
    """Every ``eval_steps`` optimizer steps, roll out the model in Meta-World and log its success rate.

    Runs only on the world's main process (``state.is_world_process_zero``) and uses no collective operation, so the
    other ranks go on without waiting for it. The model is unwrapped and put in eval mode for the rollouts, then
    put back in train mode. Each evaluation is logged through the trainer's ``log`` (keys ``eval/mean_success_rate``,
    ``eval/success/<task>``, ``eval/best_mean_success_rate``, ``eval/best_step``), so it lands in
    ``state.log_history`` once and reaches every ``report_to`` backend (TensorBoard shows it under ``train/eval/``,
    as transformers prefixes the keys it logs during training). :class:`HarmoDTTrainer` hands itself over through
    :meth:`bind_trainer`; with a plain ``Trainer`` call ``callback.bind_trainer(trainer)`` yourself, else the
    evaluation goes to ``state.log_history`` only. Each evaluation is also kept in :attr:`history` and written with
    the ``last`` and ``best`` evaluations to ``<output_dir>/eval_history.json``. The callback's state is saved in
    checkpoints (``ExportableState``), so a resumed run keeps its best.

    Args:
        eval_tasks: tasks to evaluate (a task set such as ``"mt10"`` or a list of task names).
        eval_episodes: episodes per task.
        eval_steps: evaluate every this many optimizer steps; ``None`` uses ``TrainingArguments.eval_steps``.
        seed: evaluation seed.
        max_steps: episode length (500 in the official protocol).
        num_workers: env worker processes (``None``: one per core).
        stop_on_success: end episodes at their first success.
        eval_on_train_end: also evaluate after the last step when it was not an evaluation step.
        output_dir: where ``eval_history.json`` goes (default ``TrainingArguments.output_dir``).
        precision: policy forward precision, ``"fp32"`` (default) or ``"bf16"`` (see :func:`evaluate`).
    """

    def __init__(
        self,
        eval_tasks: str | Sequence[str] = "mt10",
        eval_episodes: int = 10,
        eval_steps: int | None = None,
        seed: int = 0,
        max_steps: int = 500,
        num_workers: int | None = None,
        stop_on_success: bool = True,
        eval_on_train_end: bool = True,
        output_dir: str | None = None,
        precision: str = "fp32",
    ) -> None:
        if eval_steps is not None and (not isinstance(eval_steps, int) or eval_steps <= 0):
            raise ValueError(f"eval_steps must be a positive integer or None, got {eval_steps!r}")
        self.eval_tasks = eval_tasks if isinstance(eval_tasks, str) else list(eval_tasks)
        self.eval_episodes = eval_episodes
        self.eval_steps = eval_steps
        self.seed = seed
        self.max_steps = max_steps
        self.num_workers = num_workers
        self.stop_on_success = stop_on_success
        self.eval_on_train_end = eval_on_train_end
        self.output_dir = output_dir
        self.precision = check_precision(precision)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self._trainer = None

    def bind_trainer(self, trainer) -> None:
        """Log evaluations through ``trainer.log`` (every ``report_to`` backend and ``state.log_history``)."""
        self._trainer = trainer

    @property
    def last(self) -> dict[str, Any] | None:
        """The latest evaluation (``step``, ``mean_success_rate``, ``per_task``)."""
        return self.history[-1] if self.history else None

    def _interval(self, args: TrainingArguments) -> int | None:
        steps = self.eval_steps if self.eval_steps is not None else getattr(args, "eval_steps", None)
        if steps is None:
            return None
        if isinstance(steps, float) and steps < 1:  # a fraction of the run, as TrainingArguments allows
            return None
        return int(steps)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        interval = self._interval(args)
        if interval and state.global_step % interval == 0:
            self._evaluate(args, state, kwargs.get("model"))
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        done = self.last is not None and self.last["step"] == state.global_step
        if self.eval_on_train_end and not done:
            self._evaluate(args, state, kwargs.get("model"))
        return control

    def _evaluate(self, args: TrainingArguments, state: TrainerState, model) -> None:
        if not state.is_world_process_zero:
            return
        if model is None:
            raise ValueError("SuccessRateCallback needs the model (Trainer passes it to callbacks)")
        model = _unwrap(model)
        was_training = model.training
        model.eval()
        try:
            results = evaluate(
                model,
                tasks=self.eval_tasks,
                episodes_per_task=self.eval_episodes,
                seed=self.seed,
                stop_on_success=self.stop_on_success,
                num_workers=self.num_workers,
                max_steps=self.max_steps,
                precision=self.precision,
            )
        finally:
            model.train(was_training)
        record = {
            "step": state.global_step,
            "epoch": state.epoch,
            "mean_success_rate": results["mean_success_rate"],
            "per_task": {task: entry["success_rate"] for task, entry in results["per_task"].items()},
            "mean_return": sum(e["mean_return"] for e in results["per_task"].values()) / len(results["per_task"]),
            "wall_time_s": results["wall_time_s"],
        }
        self.history.append(record)
        if self.best is None or record["mean_success_rate"] > self.best["mean_success_rate"]:
            self.best = record
        logs = {"eval/mean_success_rate": record["mean_success_rate"]}
        logs.update({f"eval/success/{task}": rate for task, rate in record["per_task"].items()})
        logs.update(
            {"eval/best_mean_success_rate": self.best["mean_success_rate"], "eval/best_step": self.best["step"]}
        )
        if self._trainer is not None:
            self._trainer.log(logs)  # state.log_history (with the step) and every report_to backend
        else:
            state.log_history.append({**logs, "step": state.global_step})
        logger.info(
            "step %d: mean success %.3f (best %.3f at step %d)",
            state.global_step,
            record["mean_success_rate"],
            self.best["mean_success_rate"],
            self.best["step"],
        )
        self._write(Path(self.output_dir or args.output_dir))

    def _write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"last": self.last, "best": self.best, "history": self.history, "settings": self.state()["args"]}
        (directory / HISTORY_FILE).write_text(json.dumps(payload, indent=2))

    def state(self) -> dict[str, Any]:
        return {
            "args": {
                "eval_tasks": self.eval_tasks,
                "eval_episodes": self.eval_episodes,
                "eval_steps": self.eval_steps,
                "seed": self.seed,
                "max_steps": self.max_steps,
                "num_workers": self.num_workers,
                "stop_on_success": self.stop_on_success,
                "eval_on_train_end": self.eval_on_train_end,
                "output_dir": self.output_dir,
                "precision": self.precision,
            },
            "attributes": {"history": self.history, "best": self.best},
        }
