"""Command-line training: arguments (YAML + CLI), dataset → config → model → HarmoDTTrainer → model folder."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from transformers import HfArgumentParser, set_seed

from harmodt_hf.model.configuration_harmodt import HarmoDTConfig
from harmodt_hf.model.modeling_harmodt import HarmoDTModel
from harmodt_hf.tasks import MT50
from harmodt_hf.training.segments import EpisodeBuffer, SegmentDataset, SegmentSampler
from harmodt_hf.training.trainer import HarmoDTTrainer, HarmoDTTrainingArguments

# What each paper variant means for the model and the mask loop.
VARIANTS: dict[str, dict] = {
    "harmodt-f": dict(mask_mode="harmony", use_prompt=True, score="fisher"),
    "harmodt-m": dict(mask_mode="harmony", use_prompt=True, score="magnitude"),
    "harmodt-r": dict(mask_mode="random", use_prompt=True),
    # The churn control: HarmoDT's prune/regrow counts and schedule, weights chosen at random.
    "harmodt-churn": dict(mask_mode="harmony", use_prompt=True, score="random"),
    "prompt-dt": dict(mask_mode="none", use_prompt=True),
    "mtdt": dict(mask_mode="none", use_prompt=False),
}


@dataclass
class ModelArguments:
    """The model: variant and size (defaults: the paper's)."""

    variant: str = field(default="harmodt-f", metadata={"help": f"One of {sorted(VARIANTS)}."})
    hidden_size: int = 256
    n_layer: int = 6
    n_head: int = 8
    n_inner: int = 1024
    dropout: float = 0.1
    context_length: int = 20
    prompt_length: int = 5
    sparsity: float = 0.2
    mask_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the ERK task masks (default: the run's --seed, so each seed draws its own masks and "
            "variants with the same seed start from the same masks)."
        },
    )
    max_ep_len: int = 1000
    return_scale: float = 1000.0
    target_return: float = field(default=4500.0, metadata={"help": "Target return (unscaled) of every task."})


@dataclass
class DataArguments:
    """The episode dataset."""

    dataset: str = field(default="", metadata={"help": "Dataset folder or Hub dataset repo id."})
    dataset_config: str = field(default="mt10-near-optimal", metadata={"help": "Config of the dataset to train on."})
    tasks: list[str] | None = field(default=None, metadata={"help": "Subset of the dataset's tasks (default all)."})
    eval_tasks: list[str] | None = field(default=None, metadata={"help": "Evaluate on these tasks during training."})
    eval_episodes: int = field(default=0, metadata={"help": "Episodes per task for evaluation during training."})
    eval_every: int = field(default=0, metadata={"help": "Evaluate every this many steps (0: never)."})
    eval_num_workers: int | None = field(
        default=None, metadata={"help": "Env worker processes for evaluation (0: in-process; default one per core)."}
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, HarmoDTTrainingArguments)


def _yaml_to_argv(values: dict, source: str) -> list[str]:
    known = {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} in {source}: every key must be a field of ModelArguments, DataArguments or "
            "HarmoDTTrainingArguments (run training/train.py --help for the list)"
        )
    argv: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [f"--{key}", str(value).lower()]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def load_yaml_config(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config; ``extends: other.yaml`` (relative to the file) is read first and overridden."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    if path in _seen:
        raise ValueError(f"{path} extends itself (cycle through {[str(p) for p in _seen]})")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values")
    base = values.pop("extends", None)
    if base is None:
        return values
    return {**load_yaml_config(path.parent / base, (*_seen, path)), **values}


def parse_train_args(argv: list[str] | None = None):
    """Parse ``--config file.yaml`` (optional) then the command line; command-line values win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    yaml_argv: list[str] = []
    if known.config:
        path = Path(known.config)
        yaml_argv = _yaml_to_argv(load_yaml_config(path), str(path))
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    model_args, data_args, training_args, extra = parser.parse_args_into_dataclasses(
        args=yaml_argv + rest, return_remaining_strings=True
    )
    if extra:
        raise ValueError(f"Unknown command-line argument(s): {extra}")
    return validate_args(model_args, data_args, training_args)


def validate_args(model_args: ModelArguments, data_args: DataArguments, training_args: HarmoDTTrainingArguments):
    """Checks that need several argument groups; raise before any data is read."""
    if model_args.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {model_args.variant!r}")
    if not data_args.dataset:
        raise ValueError("--dataset is required: a dataset folder (dataset_scripts/generate_metaworld.py) or repo id")
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise ValueError("--max_steps must be set (> 0): HarmoDT trains for a number of steps, not epochs")
    score = VARIANTS[model_args.variant].get("score")
    if score is not None:
        training_args.score = score
    if model_args.mask_seed is None:
        model_args.mask_seed = training_args.seed
    return model_args, data_args, training_args


def build_config(model_args: ModelArguments, buffer: EpisodeBuffer) -> HarmoDTConfig:
    """The model config, with task names and per-task state stats taken from the data."""
    variant = VARIANTS[model_args.variant]
    mean, std = buffer.state_stats()
    return HarmoDTConfig(
        state_dim=int(mean.shape[1]),
        act_dim=int(buffer.tasks[0].actions[0].shape[1]),
        hidden_size=model_args.hidden_size,
        n_layer=model_args.n_layer,
        n_head=model_args.n_head,
        n_inner=model_args.n_inner,
        resid_pdrop=model_args.dropout,
        attn_pdrop=model_args.dropout,
        embd_pdrop=model_args.dropout,
        context_length=model_args.context_length,
        prompt_length=model_args.prompt_length,
        max_ep_len=model_args.max_ep_len,
        task_names=buffer.task_names,
        mask_mode=variant["mask_mode"],
        use_prompt=variant["use_prompt"],
        sparsity=model_args.sparsity,
        mask_seed=model_args.mask_seed,
        return_scale=model_args.return_scale,
        target_returns=[model_args.target_return] * len(buffer.task_names),
        state_mean=mean.tolist(),
        state_std=std.tolist(),
        variant=model_args.variant,
    )


def load_episodes(data_args: DataArguments) -> EpisodeBuffer:
    """Read the dataset config and group its episodes by task (optionally a subset of tasks)."""
    from harmodt_hf.data.loading import load_metaworld_dataset

    dataset = load_metaworld_dataset(data_args.dataset, data_args.dataset_config)
    present = list(dict.fromkeys(dataset["task_name"]))
    if all(t in MT50 for t in present):
        present.sort(key=MT50.index)  # canonical order, whatever the order of the files
    if data_args.tasks:
        missing = [t for t in data_args.tasks if t not in present]
        if missing:
            raise ValueError(
                f"Task(s) {missing} are not in {data_args.dataset} [{data_args.dataset_config}]: {present}"
            )
        tasks = list(data_args.tasks)
    else:
        tasks = present
    return EpisodeBuffer.from_dataset(dataset, tasks)


def build_trainer(model_args, data_args, training_args, buffer: EpisodeBuffer, callbacks=None) -> HarmoDTTrainer:
    """Config, model (with evaluation prompts stored), segment dataset and trainer."""
    config = build_config(model_args, buffer)
    set_seed(training_args.seed)  # the model's initial weights depend on the run's seed only
    model = HarmoDTModel(config)
    sampler = SegmentSampler(buffer, config)
    if config.use_prompt:
        model.set_task_prompts({k: np.asarray(v) for k, v in sampler.evaluation_prompts().items()})
    per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    num_items = training_args.max_steps * per_step * max(1, training_args.world_size)
    dataset = SegmentDataset(
        sampler,
        num_items=num_items,
        batch_size=training_args.per_device_train_batch_size,
        task_sampling=training_args.task_sampling,
        seed=training_args.seed,
    )
    return HarmoDTTrainer(model=model, args=training_args, train_dataset=dataset, callbacks=callbacks)


def _moved_share(trainer: HarmoDTTrainer) -> dict:
    """The share of each task's mask the schedule planned to move and the share actually moved (masked variants)."""
    if not trainer.harmodt.config.has_masks:
        return {}
    moved = trainer.moved_fraction().tolist()
    return {
        "planned_moved_fraction": trainer.planned_share,
        "moved_fraction": dict(zip(trainer.harmodt.config.task_names, moved, strict=True)),
        "mean_moved_fraction": float(np.mean(moved)),
    }


def main(argv: list[str] | None = None) -> Path:
    """Train and save the final model folder (``<output_dir>/final``); returns its path."""
    model_args, data_args, training_args = parse_train_args(argv)
    buffer = load_episodes(data_args)
    callbacks = []
    if data_args.eval_every and data_args.eval_episodes:
        from harmodt_hf.training.eval_callback import SuccessRateCallback

        callbacks.append(
            SuccessRateCallback(
                eval_tasks=data_args.eval_tasks or buffer.task_names,
                eval_episodes=data_args.eval_episodes,
                eval_steps=data_args.eval_every,
                num_workers=data_args.eval_num_workers,
            )
        )
    trainer = build_trainer(model_args, data_args, training_args, buffer, callbacks)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    final = Path(training_args.output_dir) / "final"
    trainer.save_model(str(final))
    hashes = Path(training_args.output_dir) / "mask_hashes"
    hashes.mkdir(parents=True, exist_ok=True)
    record = [{"step": h["step"], "hash": h["hash"]} for h in trainer.mask_history]
    (hashes / f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(record))
    if trainer.is_world_process_zero():
        summary = {
            "variant": model_args.variant,
            "dataset": data_args.dataset,
            "dataset_config": data_args.dataset_config,
            "tasks": buffer.task_names,
            "episodes_per_task": [len(t.rewards) for t in buffer.tasks],
            "max_steps": training_args.max_steps,
            "seed": training_args.seed,
            "task_sampling": training_args.task_sampling,
            "update_rule": training_args.update_rule,
            "mask_update_interval": training_args.mask_update_interval,
            "mask_seed": trainer.harmodt.config.mask_seed,
            "eta_max": training_args.eta_max,
            "eta_max_fraction": training_args.eta_max_fraction,
            "score": training_args.score if trainer.harmodt.config.mask_mode == "harmony" else None,
            "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), math.nan),
            "mask_history": trainer.mask_history,
            **_moved_share(trainer),
        }
        (final / "training_summary.json").write_text(json.dumps(summary, indent=2))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        (final / "trainer_log.json").write_text(json.dumps(losses))
    trainer.accelerator.wait_for_everyone()
    return final
