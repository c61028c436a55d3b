"""``harmodt-push``: upload a model folder or a dataset folder to the Hugging Face Hub, checked before and after.

    harmodt-push model path/to/model namespace/name [--private] [--revision BRANCH] [--message M]
    harmodt-push model runs/tiny/final namespace/name --results results.json   # builds the card first
    harmodt-push dataset path/to/folder namespace/name [--private] [--revision BRANCH] [--message M]

A model folder without README.md gets a model card built in place (figures, README.md, results.json) from the
evaluation results given by --results (default: the folder's results.json) and the folder's training_summary.json,
if any. The token comes from HF_TOKEN or `hf auth login`; the endpoint from HF_ENDPOINT. Everything is checked before
the upload (see :mod:`harmodt_hf.hub.push`). ``training/push_model.py`` and ``dataset_scripts/push_dataset.py`` are
the two subcommands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harmodt_hf.hub.push import (
    HubPushError,
    check_repo_id,
    push_dataset,
    push_model,
    require_token,
    validate_model_folder,
)


def build_parser() -> argparse.ArgumentParser:
    """``harmodt-push {model,dataset} FOLDER REPO_ID [options]``."""
    parser = argparse.ArgumentParser(
        prog="harmodt-push",
        description="Upload a model folder or a dataset folder to the Hugging Face Hub, checked before and after.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{model,dataset}")
    for kind in ("model", "dataset"):
        sub = commands.add_parser(kind, help=f"upload a {kind} folder to a {kind} repo")
        sub.add_argument("folder", help=f"{kind} folder to upload")
        sub.add_argument("repo_id", help=f"target {kind} repo, 'namespace/name'")
        sub.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
        sub.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
        sub.add_argument("--message", default=None, help="commit message")
    model = commands.choices["model"]
    model.add_argument(
        "--results",
        default=None,
        help="evaluation results JSON (harmodt-evaluate --output) for the card of a folder without README.md "
        "(default: <folder>/results.json)",
    )
    model.add_argument("--dataset-repo", default=None, help="Hub dataset id the model was trained on (card metadata)")
    return parser


def ensure_card(folder: Path, repo_id: str, results: str | None, dataset_repo: str | None) -> bool:
    """Build the card of a folder that has none; returns whether one was built.

    Everything the upload will need is checked first (repo id, the folder's config and weights, the results, a
    token), so a push that cannot happen writes nothing into the folder.
    """
    if (folder / "README.md").is_file() or not folder.is_dir():
        return False
    check_repo_id(repo_id)
    validate_model_folder(folder, require_card=False)
    require_token()
    results_path = Path(results) if results else folder / "results.json"
    if not results_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no README.md and there are no evaluation results at {results_path} to build one from: "
            "run harmodt-evaluate --model FOLDER --output FOLDER/results.json (or pass --results)"
        )
    from harmodt_hf.hub.cards import write_card_files
    from harmodt_hf.model import HarmoDTModel

    summary = folder / "training_summary.json"
    write_card_files(
        HarmoDTModel.from_pretrained(folder),
        folder,
        json.loads(results_path.read_text()),
        summary if summary.is_file() else None,
        dataset_repo=dataset_repo,
        repo_id=repo_id,
    )
    return True


def main(argv: list[str] | None = None) -> int:
    """``harmodt-push {model,dataset} ...``: build a model folder's missing card, push, print the commit URL."""
    parser = build_parser()
    args = parser.parse_args(argv)
    options = dict(private=args.private, revision=args.revision, commit_message=args.message)
    try:
        if args.command == "dataset":
            commit = push_dataset(args.folder, args.repo_id, **options)
        else:
            if ensure_card(Path(args.folder), args.repo_id, args.results, args.dataset_repo):
                print(f"Wrote a model card to {Path(args.folder) / 'README.md'}")
            commit = push_model(args.folder, args.repo_id, **options)
    except (ValueError, OSError, HubPushError) as err:
        parser.exit(1, f"{parser.prog} {args.command}: error: {err}\n")
    print(commit)
    return 0


def push_model_main(argv: list[str] | None = None) -> int:
    """``harmodt-push model`` (also ``training/push_model.py``)."""
    return main(["model", *(sys.argv[1:] if argv is None else argv)])


def push_dataset_main(argv: list[str] | None = None) -> int:
    """``harmodt-push dataset`` (also ``dataset_scripts/push_dataset.py``)."""
    return main(["dataset", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
