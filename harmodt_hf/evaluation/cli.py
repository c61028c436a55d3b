"""``harmodt-evaluate``: evaluate a HarmoDT model on Meta-World with the official protocol (batched rollouts).

    harmodt-evaluate --model runs/mt10/final --tasks mt10 --episodes 10 --seed 0 --output results.json
    harmodt-evaluate --model user/harmodt-mt50 --revision main --video videos --video-episodes 1
    harmodt-evaluate --model runs/mt10/final --tasks mt10 --precision bf16   # faster; not bit-faithful
    harmodt-evaluate --model runs/mt10/final --add-task reach-wall-v3 --demos data/held-out --episodes-for-prompt 5

Writes the results JSON (per-task success, returns, episode lengths, seeds, target returns, model revision) and a
per-task success bar chart next to it (``<output stem>.png``). ``training/evaluate.py`` is the same command.
``--add-task`` evaluates tasks the model never saw: each is added with a prompt and statistics from its last
``--episodes-for-prompt`` demonstrations in ``--demos`` and a merged mask (``--new-task-mask``); no training (#19).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from harmodt_hf.evaluation.rollouts import PRECISIONS, evaluate, plot_success
from harmodt_hf.model import HarmoDTModel

DESCRIPTION = "Evaluate a HarmoDT model on Meta-World with the official protocol (batched rollouts)."


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments of ``harmodt-evaluate``."""
    parser = argparse.ArgumentParser(prog="harmodt-evaluate", description=DESCRIPTION)
    parser.add_argument("--model", required=True, help="model folder or Hub repo id")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument(
        "--tasks", default=None, help="mt5/mt10/mt30/mt50 or comma-separated task names (default: the model's tasks)"
    )
    parser.add_argument(
        "--add-task",
        default=None,
        metavar="NAMES",
        help="comma-separated tasks the model never saw: add them (prompt and statistics from --demos) and evaluate "
        "them (the default --tasks)",
    )
    parser.add_argument("--demos", default=None, help="dataset folder or Hub repo: demonstrations of --add-task")
    parser.add_argument(
        "--demos-config", default=None, help="dataset config of the demonstrations (default <task>-near-optimal)"
    )
    parser.add_argument(
        "--episodes-for-prompt", type=int, default=None, help="use the last N demonstrations of each task (default all)"
    )
    parser.add_argument(
        "--new-task-mask", help="mask of an added task: merged (default on masked models), ones or a trained task"
    )
    parser.add_argument(
        "--merge-threshold", type=int, default=None, help="merged mask: trained tasks that must keep a weight"
    )
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task (one goal each, at most 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=500, help="episode length (500 in the official protocol)")
    parser.add_argument(
        "--no-stop-on-success",
        action="store_true",
        help="run every episode to max-steps (returns/lengths over the whole episode; same success rate)",
    )
    parser.add_argument("--num-workers", type=int, default=None, help="env worker processes (default: CPU cores)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch CPU threads for the policy (1: bit-identical actions whatever the batch; fastest on busy cores)",
    )
    parser.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default="fp32",
        help="policy forward precision: fp32 (default, the official evaluation) or bf16 autocast (about 2x "
        "faster per step on AMX CPUs; actions differ slightly; recorded in the results)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--output", default="results.json", help="results JSON path")
    parser.add_argument("--plot", default=None, help="success bar chart (default: <output stem>.png; 'none' to skip)")
    parser.add_argument("--video", default=None, metavar="DIR", help="write episode videos to DIR")
    parser.add_argument("--video-episodes", type=int, default=1, help="episodes per task to film (with --video)")
    parser.add_argument("--video-format", choices=("mp4", "gif"), default="mp4")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _writable_file(path: Path, what: str) -> Path:
    """``path`` can be written as a file: not a folder, its folder creatable and writable (created now)."""
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder: pass a file path such as {path / 'results.json'}")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{what} {path}: cannot create its folder {parent} ({error.strerror or error})") from error
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{what} {path} is not writable")
    return path


def check_outputs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """Check every output path before the evaluation runs; returns the results and plot paths."""
    output = _writable_file(Path(args.output), "--output")
    if output.suffix.lower() == ".png":
        raise ValueError(f"--output {output} is the results JSON, not the plot: use --plot for the figure")
    plot = None
    if (args.plot or "").lower() != "none":
        plot = _writable_file(Path(args.plot) if args.plot else output.with_suffix(".png"), "--plot")
        if plot.resolve() == output.resolve():
            raise ValueError(f"--plot {plot} would overwrite the results JSON --output {output}")
    if args.video is not None and Path(args.video).exists() and not Path(args.video).is_dir():
        raise ValueError(f"--video {args.video} is a file: pass a folder for the videos")
    return output, plot


def add_tasks(model: HarmoDTModel, args: argparse.Namespace) -> list[str]:
    """Add the ``--add-task`` tasks to ``model`` from their demonstrations; returns their names (none: ``[]``)."""
    if args.add_task is None:
        if args.demos is not None or args.episodes_for_prompt is not None:
            raise ValueError("--demos and --episodes-for-prompt go with --add-task (the tasks the model never saw)")
        return []
    if not args.demos:
        raise ValueError("--add-task needs --demos: a dataset folder or Hub repo with demonstrations of the new task")
    from harmodt_hf.training.demonstrations import add_task_from_demonstrations

    names = [name.strip() for name in args.add_task.split(",") if name.strip()]
    for name in names:
        add_task_from_demonstrations(
            model,
            name,
            args.demos,
            args.demos_config,
            last=args.episodes_for_prompt,
            mask=args.new_task_mask,  # None: the merged mask on a masked model, none on an unmasked one
            merge_threshold=args.merge_threshold,
        )
    return names


def main(argv: list[str] | None = None) -> dict:
    """Check the outputs, evaluate, write the results JSON and plot, print a summary; returns the results."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    output, plot = check_outputs(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = HarmoDTModel.from_pretrained(args.model, revision=args.revision)
    added = add_tasks(model, args)
    model.to(device)
    results = evaluate(
        model,
        tasks=args.tasks if args.tasks is not None else (added or list(model.config.task_names)),
        episodes_per_task=args.episodes,
        seed=args.seed,
        stop_on_success=not args.no_stop_on_success,
        num_workers=args.num_workers,
        max_steps=args.max_steps,
        video_episodes=args.video_episodes if args.video else 0,
        video_dir=args.video,
        video_format=args.video_format,
        progress=True,
        torch_threads=args.torch_threads,
        precision=args.precision,
    )
    if added:
        results["added_tasks"] = {name: model.config.added_tasks[name] for name in added}
        results["added_tasks_demos"] = {"demos": args.demos, "episodes_for_prompt": args.episodes_for_prompt}
    output.write_text(json.dumps(results, indent=2))
    if plot is not None:
        plot_success(results, plot)
    width = max(len(task) for task in results["per_task"])
    for task, entry in results["per_task"].items():
        print(f"{task:<{width}}  success {100 * entry['success_rate']:5.1f} %  return {entry['mean_return']:8.1f}")
    print(f"mean success rate: {100 * results['mean_success_rate']:.1f} % ({results['precision']}) -> {output}")
    return results


def cli_main() -> None:
    """Console-script entry point (``harmodt-evaluate``): bad arguments and unreadable models are one-line errors."""
    try:
        main()
    except (ValueError, OSError) as error:
        sys.exit(f"harmodt-evaluate: error: {error}")
