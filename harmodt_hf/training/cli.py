"""Command-line training: arguments (YAML + CLI), dataset → config → model → HarmoDTTrainer → model folder.

``cli_main`` is the console entry point (``training/train.py``); ``main(argv)`` returns the final model folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import re
import shutil
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch.distributed as dist
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
# HarmoDTConfig arguments a run sets on the command line, with the config's own types, defaults and help. The other
# config fields come from the data (dims, task names, state statistics), the variant (mask_mode, use_prompt) or the
# options below (dropout sets the three dropout rates, target_return every task's target return).
CONFIG_ARGUMENTS = (
    "hidden_size", "n_layer", "n_head", "n_inner", "activation_function", "context_length", "prompt_length",
    "max_ep_len", "sparsity", "return_scale",
)  # fmt: skip
EVAL_EPISODE_STEPS = 500  # episode length of the evaluations during training (the official protocol)


def _config_help() -> dict[str, str]:
    """Each HarmoDTConfig argument's help, read from the ``Args:`` section of its docstring."""
    helps = {}
    for match in re.finditer(r"^ {8}(\w+(?: / \w+)*): (.+(?:\n {12}.+)*)", HarmoDTConfig.__doc__ or "", re.M):
        for name in match.group(1).split(" / "):
            helps[name] = " ".join(match.group(2).split()).replace("%", "%%")
    return helps


def _model_arguments() -> type:
    """The ``ModelArguments`` dataclass: the variant, the CONFIG_ARGUMENTS of HarmoDTConfig (types, defaults and
    help taken from it) and three options of the command line (dropout, mask_seed, target_return)."""
    defaults = inspect.signature(HarmoDTConfig.__init__).parameters
    types, helps = typing.get_type_hints(HarmoDTConfig.__init__), _config_help()
    fields = [("variant", str, field(default="harmodt-f", metadata={"help": f"One of {sorted(VARIANTS)}."}))]
    for name in CONFIG_ARGUMENTS:
        metadata = {"help": f"{helps.get(name, '')} (HarmoDTConfig.{name})"}
        fields.append((name, types[name], field(default=defaults[name].default, metadata=metadata)))
    dropout_help = "Dropout rate of the residual, attention and embedding layers (HarmoDTConfig.*_pdrop)."
    mask_seed_help = (
        "Seed of the ERK task masks (default: the run's --seed, so each seed draws its own masks and variants with "
        "the same seed start from the same masks)."
    )
    fields += [
        ("dropout", float, field(default=defaults["resid_pdrop"].default, metadata={"help": dropout_help})),
        ("mask_seed", int | None, field(default=None, metadata={"help": mask_seed_help})),
        ("target_return", float, field(default=4500.0, metadata={"help": "Target return (unscaled) of every task."})),
    ]
    return dataclasses.make_dataclass("ModelArguments", fields, namespace={"__doc__": "The model: variant and size."})


ModelArguments = _model_arguments()


@dataclass
class DataArguments:
    """The episode dataset, and the evaluations during training."""

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


def check_config_keys(values: dict, source: str, classes: tuple[type, ...] = ARGUMENT_CLASSES) -> None:
    """Refuse a config key that is no field of ``classes`` (a typo would otherwise be ignored)."""
    unknown = sorted(set(values) - {f.name for cls in classes for f in dataclasses.fields(cls)})
    if unknown:
        names = ", ".join(cls.__name__ for cls in classes)
        raise ValueError(
            f"Unknown key(s) {unknown} in {source}: every key must be a field of {names} "
            "(run training/train.py --help for the list)"
        )


def _yaml_to_argv(values: dict, source: str) -> list[str]:
    check_config_keys(values, source)
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
    values: dict = {}
    if known.config:
        values = load_yaml_config(Path(known.config))
    parser = HfArgumentParser(
        ARGUMENT_CLASSES,
        description="Train HarmoDT (or a baseline). --config FILE.yaml sets any of the options below; the command "
        "line wins.",
    )
    model_args, data_args, training_args, extra = parser.parse_args_into_dataclasses(
        args=_yaml_to_argv(values, str(known.config)) + rest, return_remaining_strings=True
    )
    if extra:
        raise ValueError(f"Unknown command-line argument(s): {extra}")
    given = set(values) | {arg[2:].split("=")[0] for arg in rest if arg.startswith("--")}
    return validate_args(model_args, data_args, training_args, given)


def validate_args(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: HarmoDTTrainingArguments,
    given: set[str] = frozenset(),
):
    """Checks that need several argument groups, before any data is read; ``given``: the options set explicitly
    (YAML or command line), which must not contradict the variant."""
    if model_args.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {model_args.variant!r}")
    if not data_args.dataset:
        raise ValueError("--dataset is required: a dataset folder (dataset_scripts/generate_metaworld.py) or repo id")
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise ValueError("--max_steps must be set (> 0): HarmoDT trains for a number of steps, not epochs")
    variant = VARIANTS[model_args.variant]
    if "score" in given and training_args.score != variant.get("score"):
        implied = f"scores by {variant['score']!r}" if "score" in variant else "has no mask updates to score"
        fitting = [name for name, v in VARIANTS.items() if v.get("score") == training_args.score]
        raise ValueError(
            f"--score {training_args.score} contradicts --variant {model_args.variant}, which {implied}: drop --score"
            + (f", or use --variant {fitting[0]}" if fitting else "")
        )
    training_args.score = variant.get("score", training_args.score)
    if data_args.eval_every and data_args.eval_episodes and model_args.max_ep_len < EVAL_EPISODE_STEPS:
        raise ValueError(
            f"--max_ep_len {model_args.max_ep_len} is shorter than the {EVAL_EPISODE_STEPS}-step episodes of the "
            f"evaluations during training (--eval_every): set --max_ep_len >= {EVAL_EPISODE_STEPS}"
        )
    if model_args.mask_seed is None:
        model_args.mask_seed = training_args.seed
    return model_args, data_args, training_args


def prepare_output_dir(training_args: HarmoDTTrainingArguments) -> None:
    """Check the output folder before any work: an earlier run in it (a final model or checkpoints) is refused
    unless the run resumes it (``--resume_from_checkpoint``) or replaces it (``--overwrite_output_dir``, which
    deletes its final model, checkpoints, mask hashes and evaluation history first)."""
    out = Path(training_args.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out} is a file, not a folder")
    resume, overwrite = training_args.resume_from_checkpoint, training_args.overwrite_output_dir
    if resume and overwrite:
        raise ValueError(
            "--resume_from_checkpoint and --overwrite_output_dir contradict each other: resume the run, or replace it"
        )
    earlier = sorted(out.glob("checkpoint-*")) + [p for p in (out / "final",) if p.exists()]
    if not earlier or resume:
        return
    if not overwrite:
        raise ValueError(
            f"--output_dir {out} holds an earlier run ({', '.join(p.name for p in earlier[:4])}"
            f"{', ...' if len(earlier) > 4 else ''}): resume it with --resume_from_checkpoint "
            f"{earlier[0]}, train into another --output_dir, or pass --overwrite_output_dir true to delete it and "
            "start afresh"
        )
    if training_args.process_index == 0:
        for path in [*earlier, out / "mask_hashes", out / "eval_history.json"]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def build_config(model_args: ModelArguments, buffer: EpisodeBuffer) -> HarmoDTConfig:
    """The model config: the CONFIG_ARGUMENTS given, the variant's mask mode and prompt, and the dims, task names
    and per-task state stats of the data."""
    variant = VARIANTS[model_args.variant]
    mean, std = buffer.state_stats()
    return HarmoDTConfig(
        **{name: getattr(model_args, name) for name in CONFIG_ARGUMENTS},
        state_dim=int(mean.shape[1]),
        act_dim=int(buffer.tasks[0].actions[0].shape[1]),
        resid_pdrop=model_args.dropout,
        attn_pdrop=model_args.dropout,
        embd_pdrop=model_args.dropout,
        task_names=buffer.task_names,
        mask_mode=variant["mask_mode"],
        use_prompt=variant["use_prompt"],
        mask_seed=model_args.mask_seed,
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
    prepare_output_dir(training_args)
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
                max_steps=EVAL_EPISODE_STEPS,
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


def cli_main() -> None:
    """Console entry point (``training/train.py``): train from ``sys.argv``, print where the model is, and tear down
    the process group of a multi-process run."""
    try:
        final = main(sys.argv[1:])
        print(f"Model saved to {final}")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
