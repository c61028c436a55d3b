"""``harmodt-generate-data`` and ``harmodt-convert-official``: write Meta-World episode dataset folders.

    # MT50 at the official size (2000 episodes of 500 steps per task) with 16 processes
    harmodt-generate-data --tasks mt50 --episodes-per-task 2000 --num-workers 16 --output mt50
    # the same split over 4 machines (or under a launcher: --shard-from-env reads $RANK/$WORLD_SIZE)
    harmodt-generate-data --tasks mt50 --output mt50 --shard-index 0 --num-shards 4
    # the official HarmoDT / MTDiff data (<task>-v2/<i>.npz) in the same format
    harmodt-convert-official --source MT50/dataset --output mt50-official --tasks mt5

Re-running the same command resumes a killed run. Copy the shards of several machines into one folder and re-run
the full command there to refresh stats.json and the README for the whole folder. ``dataset_scripts/*.py`` are the
same commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

GENERATE_DESCRIPTION = "Generate Meta-World offline datasets (parquet, Hub-ready folder) with the scripted experts."
CONVERT_DESCRIPTION = "Convert the official HarmoDT / MTDiff Meta-World data (<task>-v2/<i>.npz) into a dataset folder."


def build_generate_parser() -> argparse.ArgumentParser:
    """Command-line arguments of ``harmodt-generate-data``."""
    p = argparse.ArgumentParser(prog="harmodt-generate-data", description=GENERATE_DESCRIPTION)
    p.add_argument("--tasks", default="mt50", help="mt5, mt10, mt30, mt50, or comma-separated v3 task names")
    p.add_argument("--episodes-per-task", type=int, default=2000, help="N (>= 2); sub-optimal = first N // 2")
    p.add_argument("--output", required=True, help="dataset folder to create or resume")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--benchmark-seed", type=int, default=0, help="seed of MT1(task) whose 50 goals are used")
    p.add_argument("--num-workers", type=int, default=1, help="processes on this machine")
    p.add_argument("--shard-index", type=int, default=None, help="this machine's index (default 0)")
    p.add_argument("--num-shards", type=int, default=None, help="number of machines (default 1)")
    p.add_argument(
        "--shard-from-env",
        action="store_true",
        help="take --shard-index/--num-shards from $RANK/$WORLD_SIZE (as set by torchrun or accelerate launch)",
    )
    p.add_argument("--chunk-size", type=int, default=10, help="episodes per job sent to a worker")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset made earlier with other settings")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def build_convert_parser() -> argparse.ArgumentParser:
    """Command-line arguments of ``harmodt-convert-official``."""
    p = argparse.ArgumentParser(prog="harmodt-convert-official", description=CONVERT_DESCRIPTION)
    p.add_argument("--source", required=True, help="folder holding <task>-v2/<i>.npz")
    p.add_argument("--output", required=True, help="dataset folder to create or resume")
    p.add_argument("--tasks", default=None, help="mt5, mt10, mt30, mt50 or comma-separated v3 names (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset made earlier with other settings")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def shard_arguments(args: argparse.Namespace) -> tuple[int, int]:
    """This process's (shard index, number of shards): the flags, or $RANK/$WORLD_SIZE with --shard-from-env only.

    Says on stderr where they came from when the environment is read, and that it is ignored when a launcher's
    variables are set without the flag.
    """
    launched = {name: os.environ[name] for name in ("RANK", "WORLD_SIZE") if name in os.environ}
    if not args.shard_from_env:
        if launched and int(launched.get("WORLD_SIZE", 1)) > 1:
            print(
                f"note: {', '.join(f'{k}={v}' for k, v in launched.items())} ignored; pass --shard-from-env to split "
                "the tasks over the launched processes",
                file=sys.stderr,
            )
        return (args.shard_index or 0, args.num_shards or 1)
    if args.shard_index is not None or args.num_shards is not None:
        raise ValueError("--shard-from-env takes the shard from $RANK/$WORLD_SIZE: drop --shard-index/--num-shards")
    if set(launched) != {"RANK", "WORLD_SIZE"}:
        raise ValueError("--shard-from-env needs $RANK and $WORLD_SIZE (set by torchrun or accelerate launch)")
    shard_index, num_shards = int(launched["RANK"]), int(launched["WORLD_SIZE"])
    print(f"shard {shard_index + 1}/{num_shards} from RANK={shard_index}, WORLD_SIZE={num_shards}", file=sys.stderr)
    return shard_index, num_shards


def generate_main(argv: list[str] | None = None) -> int:
    """``harmodt-generate-data``: generate (or resume) a dataset folder; prints what was done as JSON."""
    args = build_generate_parser().parse_args(argv)
    from harmodt_hf.data.generation import generate_dataset

    try:
        shard_index, num_shards = shard_arguments(args)
        result = generate_dataset(
            args.output,
            args.tasks,
            args.episodes_per_task,
            seed=args.seed,
            num_workers=args.num_workers,
            shard_index=shard_index,
            num_shards=num_shards,
            overwrite=args.overwrite,
            benchmark_seed=args.benchmark_seed,
            chunk_size=args.chunk_size,
            progress=not args.no_progress,
        )
    except (ValueError, FileExistsError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=1))
    return 0


def convert_main(argv: list[str] | None = None) -> int:
    """``harmodt-convert-official``: convert (or resume converting) the official data; prints what was done."""
    args = build_convert_parser().parse_args(argv)
    from harmodt_hf.data.conversion import convert_official_dataset

    try:
        result = convert_official_dataset(
            args.source, args.output, args.tasks, overwrite=args.overwrite, progress=not args.no_progress
        )
    except (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=1))
    return 0
