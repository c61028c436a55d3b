"""Few-shot adaptation from the command line: ``training/train.py --config harmodt_hf/configs/adapt.yaml``.

A config (YAML or command line) with ``adapt_from`` adapts a trained model instead of training one: every task of
``adapt_tasks`` is added (prompt and statistics from its last ``demo_episodes`` demonstrations in ``dataset``, mask
``new_task_mask``), then :func:`~.adaptation.adapt` fine-tunes (``adapt_train``: prompt / embeddings / all) for
``max_steps`` steps; the model folder is ``<output_dir>/final`` (with ``adaptation_summary.json``). Without
``adapt_from`` the command trains as :mod:`.cli` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from transformers import HfArgumentParser, set_seed

from harmodt_hf.model.modeling_harmodt import HarmoDTModel
from harmodt_hf.training import cli
from harmodt_hf.training.adaptation import AdaptationArguments, adapt, final_loss
from harmodt_hf.training.demonstrations import add_task_from_demonstrations
from harmodt_hf.training.trainer import HarmoDTTrainingArguments

ARGUMENT_CLASSES = (AdaptationArguments, HarmoDTTrainingArguments)


def _split_config(argv: list[str]) -> tuple[dict, list[str]]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    return (cli.load_yaml_config(Path(known.config)) if known.config else {}), rest


def adaptation_requested(argv: list[str]) -> bool:
    """Whether the config or the command line names a model to adapt (``adapt_from``)."""
    values, rest = _split_config(argv)
    return bool(values.get("adapt_from")) or any(arg.split("=")[0] == "--adapt_from" for arg in rest)


def parse_adapt_args(argv: list[str]) -> tuple[AdaptationArguments, HarmoDTTrainingArguments]:
    """``--config file.yaml`` (its values are the defaults) then the command line, which wins."""
    values, rest = _split_config(argv)
    cli.check_config_keys(values, "the adaptation config", ARGUMENT_CLASSES)
    parser = HfArgumentParser(ARGUMENT_CLASSES, description="Adapt a trained HarmoDT model to new tasks.")
    parser.set_defaults(**values)
    adapt_args, training_args, extra = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if extra:
        raise ValueError(f"Unknown command-line argument(s): {extra}")
    if not adapt_args.adapt_tasks:
        raise ValueError("adapt_tasks is required: the new tasks to add and adapt to (e.g. [reach-wall-v3])")
    if not adapt_args.dataset:
        raise ValueError("dataset is required: a dataset folder or Hub repo holding the new tasks' demonstrations")
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise ValueError("max_steps must be set (> 0): adaptation trains for a number of steps")
    return adapt_args, training_args


def adapt_main(argv: list[str]) -> Path:
    """Add the new tasks, adapt, save ``<output_dir>/final``; returns its path."""
    adapt_args, training_args = parse_adapt_args(argv)
    set_seed(training_args.seed)
    model = HarmoDTModel.from_pretrained(adapt_args.adapt_from)
    demos = [
        add_task_from_demonstrations(
            model,
            task,
            adapt_args.dataset,
            adapt_args.demos_config,
            last=adapt_args.demo_episodes,
            mask=adapt_args.new_task_mask,  # None: the merged mask on a masked model, none on an unmasked one
            merge_threshold=adapt_args.merge_threshold,
            std_floor=adapt_args.std_floor,
        )
        for task in adapt_args.adapt_tasks
    ]
    trainer = adapt(model, demos, training_args, train=adapt_args.adapt_train)
    final = Path(training_args.output_dir) / "final"
    model.save_pretrained(final)
    summary = {
        **dataclasses.asdict(adapt_args),
        "max_steps": training_args.max_steps,
        "seed": training_args.seed,
        "mask_updates": training_args.mask_updates,
        "demo_episodes_used": {d.task_name: d.num_episodes for d in demos},
        "final_loss": final_loss(trainer),
    }
    (final / "adaptation_summary.json").write_text(json.dumps(summary, indent=2))
    return final


def cli_main() -> None:
    """``training/train.py``: adapt when the config names ``adapt_from``, else train (:func:`.cli.cli_main`)."""
    argv = sys.argv[1:]
    if adaptation_requested(argv):
        print(f"Model saved to {adapt_main(argv)}")
    else:
        cli.cli_main()
