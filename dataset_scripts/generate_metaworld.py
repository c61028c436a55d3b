"""Generate Meta-World offline datasets (parquet, Hub-ready folder) with the scripted experts.

Examples::

    # MT50 at the official size (2000 episodes of 500 steps per task) with 16 processes
    python dataset_scripts/generate_metaworld.py --tasks mt50 --episodes-per-task 2000 --num-workers 16 --output mt50
    # the same split over 4 machines (or `accelerate launch`, which sets RANK/WORLD_SIZE)
    python dataset_scripts/generate_metaworld.py --tasks mt50 --output mt50 --shard-index 0 --num-shards 4

Re-running the same command resumes a killed run. Copy the shards of several machines into one folder and re-run
the full command there to refresh stats.json and the README for the whole folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from harmodt_hf.data.generation import generate_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="mt50", help="mt5, mt10, mt30, mt50, or comma-separated v3 task names")
    p.add_argument("--episodes-per-task", type=int, default=2000, help="N (>= 2); sub-optimal = first N // 2")
    p.add_argument("--output", required=True, help="dataset folder to create or resume")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--benchmark-seed", type=int, default=0, help="seed of MT1(task) whose 50 goals are used")
    p.add_argument("--num-workers", type=int, default=1, help="processes on this machine")
    p.add_argument("--shard-index", type=int, default=None, help="this machine's index (default: $RANK or 0)")
    p.add_argument("--num-shards", type=int, default=None, help="number of machines (default: $WORLD_SIZE or 1)")
    p.add_argument("--chunk-size", type=int, default=10, help="episodes per job sent to a worker")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset made earlier with other settings")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shard_index = args.shard_index if args.shard_index is not None else int(os.environ.get("RANK", 0))
    num_shards = args.num_shards if args.num_shards is not None else int(os.environ.get("WORLD_SIZE", 1))
    try:
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


if __name__ == "__main__":
    sys.exit(main())
