"""Upload a saved model folder (config.json, model.safetensors, README.md) to a Hub model repo.

    python training/push_model.py path/to/model namespace/name [--private] [--revision BRANCH] [--message M]
    python training/push_model.py runs/tiny/final namespace/name --results results.json   # builds the card first

A folder without README.md gets a model card built in place (figures, README.md, results.json) from the evaluation
results given by --results (default: the folder's results.json) and the folder's training_summary.json, if any.
The token comes from HF_TOKEN or `huggingface-cli login`; the endpoint from HF_ENDPOINT. Everything is checked
before the upload (see `harmodt_hf.hub.push_model`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harmodt_hf.hub.push import HubPushError, push_model


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="model folder to upload (as written by save_pretrained, plus README.md)")
    parser.add_argument("repo_id", help="target model repo, 'namespace/name'")
    parser.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    parser.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    parser.add_argument("--message", default=None, help="commit message")
    parser.add_argument(
        "--results",
        default=None,
        help="evaluation results JSON (training/evaluate.py --output) for the card of a folder without README.md "
        "(default: <folder>/results.json)",
    )
    parser.add_argument("--dataset-repo", default=None, help="Hub dataset id the model was trained on (card metadata)")
    return parser


def ensure_card(folder: Path, repo_id: str, results: str | None, dataset_repo: str | None) -> bool:
    """Build the card of a folder that has none; returns whether one was built."""
    if (folder / "README.md").is_file() or not folder.is_dir():
        return False
    results_path = Path(results) if results else folder / "results.json"
    if not results_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no README.md and there are no evaluation results at {results_path} to build one from: "
            "run training/evaluate.py --model FOLDER --output FOLDER/results.json (or pass --results)"
        )
    import harmodt_hf  # noqa: F401  (registers the model type)
    from harmodt_hf import HarmoDTModel
    from harmodt_hf.hub.cards import write_card_files

    model = HarmoDTModel.from_pretrained(folder)
    summary = folder / "training_summary.json"
    write_card_files(
        model,
        folder,
        json.loads(results_path.read_text()),
        summary if summary.is_file() else None,
        dataset_repo=dataset_repo,
        repo_id=repo_id,
    )
    return True


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build a missing card, push, print the commit URL."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if ensure_card(Path(args.folder), args.repo_id, args.results, args.dataset_repo):
            print(f"Wrote a model card to {Path(args.folder) / 'README.md'}")
        commit = push_model(
            args.folder, args.repo_id, private=args.private, revision=args.revision, commit_message=args.message
        )
    except (ValueError, OSError, HubPushError) as err:
        parser.exit(1, f"push_model: error: {err}\n")
    print(commit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
