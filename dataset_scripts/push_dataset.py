"""Upload a dataset folder (README.md with `configs:`, parquet files) to a Hub dataset repo.

    python dataset_scripts/push_dataset.py path/to/folder namespace/name [--private] [--revision BRANCH] [--message M]

The token comes from HF_TOKEN or `huggingface-cli login`; the endpoint from HF_ENDPOINT. Everything is checked
before the upload (see `harmodt_hf.hub.push_dataset`).
"""

from __future__ import annotations

import argparse
import sys

from harmodt_hf.hub.push import HubPushError, push_dataset


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="dataset folder to upload")
    parser.add_argument("repo_id", help="target dataset repo, 'namespace/name'")
    parser.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    parser.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    parser.add_argument("--message", default=None, help="commit message")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, push, print the commit URL."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        commit = push_dataset(
            args.folder, args.repo_id, private=args.private, revision=args.revision, commit_message=args.message
        )
    except (ValueError, OSError, HubPushError) as err:
        parser.exit(1, f"push_dataset: error: {err}\n")
    print(commit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
