"""Convert the official HarmoDT / MTDiff Meta-World data (``<task>-v2/<i>.npz``) into a parquet dataset folder.

Example::

    python dataset_scripts/convert_official.py --source MT50/dataset --output mt50-official
    python dataset_scripts/convert_official.py --source MT50/dataset --output mt5-official --tasks mt5

Configs follow the official rule: ``<set>-near-optimal`` = all episodes, ``<set>-sub-optimal`` = the first half.
"""

from __future__ import annotations

import argparse
import json
import sys

from harmodt_hf.data.conversion import convert_official_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="folder holding <task>-v2/<i>.npz")
    p.add_argument("--output", required=True, help="dataset folder to create or resume")
    p.add_argument("--tasks", default=None, help="mt5, mt10, mt30, mt50 or comma-separated v3 names (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset made earlier with other settings")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = convert_official_dataset(
            args.source, args.output, args.tasks, overwrite=args.overwrite, progress=not args.no_progress
        )
    except (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
