"""Publish model and dataset folders to the Hugging Face Hub, checked before and after the upload.

Before anything goes over the network: the repo id is valid, the folder holds what a Hub repo of its kind needs (a
model: ``config.json``, safetensors weights, ``README.md``; a dataset: ``README.md`` and parquet files matching the
card's ``configs:``), every local file the card links to exists and will be uploaded, and a token is available.
After the upload: the remote tree at the target revision holds every local file with the same size and hash, so a
half-finished upload is never reported as success.

A dataset folder larger than :data:`LARGE_FOLDER_BYTES` goes up with ``HfApi.upload_large_folder`` where
huggingface_hub has it (1.x; 2.x's ``upload_folder`` itself commits in batches and resumes).

The endpoint, token and caches are huggingface_hub's (``HF_ENDPOINT``, ``HF_TOKEN`` / ``hf auth login``, ...).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml
from huggingface_hub import CommitInfo, HfApi, get_token, metadata_load
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, HFValidationError, filter_repo_objects, validate_repo_id
from huggingface_hub.utils.sha import git_hash, sha_fileobj

from harmodt_hf.data.folder import config_files, describe_partial
from harmodt_hf.data.validation import check_shard

__all__ = [
    "LARGE_FOLDER_BYTES",
    "PICKLE_PATTERNS",
    "HubAuthError",
    "HubPushError",
    "card_links",
    "check_repo_id",
    "push_dataset",
    "push_model",
    "require_token",
    "validate_dataset_folder",
    "validate_model_folder",
]

# Never uploaded (besides huggingface_hub's own .git / .cache/huggingface): half-written files, Python caches, and
# pickles (a Trainer's training_args.bin, optimizer.pt, rng_state.pth, ...: loading a pickle can run code).
PICKLE_PATTERNS: list[str] = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.joblib"]
IGNORE_PATTERNS: list[str] = ["*.tmp", "__pycache__", "*/__pycache__/*", "__pycache__/*", "*.pyc", *PICKLE_PATTERNS]
logger = logging.getLogger(__name__)
MODEL_WEIGHTS = "model.safetensors"
MODEL_WEIGHTS_INDEX = "model.safetensors.index.json"
LARGE_FOLDER_BYTES = 5 * 2**30  # datasets above this go up with upload_large_folder (where huggingface_hub has it)
_TOKEN_HELP = (
    "set the HF_TOKEN environment variable, pass token=..., or log in with `huggingface-cli login` / `hf auth login`"
)


class HubPushError(RuntimeError):
    """The Hub refused the upload, or the uploaded repo does not match the local folder."""


class HubAuthError(HubPushError):
    """No token, or a token the Hub rejects."""


# ---------------------------------------------------------------------------------------------------------------------
# Local checks (no network)
# ---------------------------------------------------------------------------------------------------------------------
def check_repo_id(repo_id: str) -> str:
    """Validate ``repo_id`` ("namespace/name" or "name") with huggingface_hub's rules; a clear ValueError if bad."""
    try:
        if not isinstance(repo_id, str):
            raise HFValidationError(f"a repo id is a string, not {type(repo_id).__name__}.")
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(
            f"Invalid repo id {repo_id!r}: {err} Use 'namespace/name' made of letters, digits, '-', '_' and '.'."
        ) from err
    return repo_id


_MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
_MD_REF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
_HTML_SRC = re.compile(
    r"<(?:img|a|video|source|audio|embed|iframe)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.I
)
_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")


def card_links(text: str) -> list[str]:
    """Relative local paths a card links to (markdown links and images, reference links, HTML src/href).

    URLs with a scheme (``https:``, ``mailto:``...), protocol-relative and absolute paths, and in-page anchors are
    not local files; anchors and queries are stripped; code blocks and inline code are skipped.
    """
    body = REGEX_YAML_BLOCK.sub("", text, count=1)
    body = _INLINE_CODE.sub("", _FENCE.sub("", body))
    found: list[str] = []
    for target in [*_MD_LINK.findall(body), *_MD_REF.findall(body), *_HTML_SRC.findall(body)]:
        target = target.strip()
        if not target or target.startswith(("#", "/", "\\")) or urlsplit(target).scheme:
            continue
        path = unquote(target.split("#", 1)[0].split("?", 1)[0]).removeprefix("./")
        if path and path not in found:
            found.append(path)
    return found


def _upload_list(folder: Path) -> list[str]:
    """Files ``upload_folder`` will send, as POSIX paths relative to ``folder`` (same ignore rules); says which
    pickle files stay behind."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    kept = list(filter_repo_objects(files, ignore_patterns=[*DEFAULT_IGNORE_PATTERNS, *IGNORE_PATTERNS]))
    pickles = list(filter_repo_objects(files, allow_patterns=PICKLE_PATTERNS, ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    if pickles:
        logger.warning("Not uploading %s from %s: pickle files (loading one can run code)", ", ".join(pickles), folder)
    return kept


def _check_card(folder: Path, uploads: list[str]) -> None:
    """README.md exists, its YAML parses, and every file it links to is in ``uploads``."""
    readme = folder / "README.md"
    if not readme.is_file():
        raise FileNotFoundError(f"{folder} has no README.md: a Hub repo needs its card.")
    try:
        metadata_load(readme)
    except yaml.YAMLError as err:
        raise ValueError(f"{readme} has invalid YAML metadata: {err}") from err
    links = [link.rstrip("/") for link in card_links(readme.read_text(encoding="utf-8"))]
    escaping = [link for link in links if ".." in PurePosixPath(link).parts]
    if escaping:
        raise ValueError(f"README.md links to files outside {folder}, which would not be uploaded: {escaping}")
    missing = [link for link in links if link not in uploads and not any(u.startswith(link + "/") for u in uploads)]
    if missing:
        raise FileNotFoundError(
            f"README.md links to local files that are missing from {folder} (or excluded from upload): {missing}"
        )


def require_token(token: str | None = None) -> str:
    """The token an upload will use (``token``, ``HF_TOKEN`` or the saved login); HubAuthError without one.

    Only looks locally: whether the Hub accepts the token is checked at upload time.
    """
    token = token or get_token()
    if not token:
        raise HubAuthError(f"No Hugging Face token found for uploading: {_TOKEN_HELP}.")
    return token


def validate_model_folder(folder: str | os.PathLike, require_card: bool = True) -> list[str]:
    """Check a model folder (config.json, safetensors weights or a complete sharded index, README.md and the files it
    links to; without ``require_card`` the card is not looked at). Returns the files that will be uploaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Model folder {folder} does not exist.")
    uploads = _upload_list(folder)
    problems = []
    if "config.json" not in uploads:
        problems.append("config.json (save the model with save_pretrained)")
    if MODEL_WEIGHTS_INDEX in uploads:
        shards = set(json.loads((folder / MODEL_WEIGHTS_INDEX).read_text()).get("weight_map", {}).values())
        absent = sorted(shards - set(uploads))
        if not shards or absent:
            problems.append(f"the shards listed in {MODEL_WEIGHTS_INDEX} ({absent or 'empty weight_map'})")
    elif MODEL_WEIGHTS not in uploads:
        problems.append(f"weights ({MODEL_WEIGHTS} or {MODEL_WEIGHTS_INDEX} with its shards)")
    if require_card and "README.md" not in uploads:
        problems.append("README.md (the model card)")
    if problems:
        raise FileNotFoundError(f"Model folder {folder} is incomplete, missing: " + "; ".join(problems))
    if require_card:
        _check_card(folder, uploads)
    return uploads


def validate_dataset_folder(folder: str | os.PathLike) -> list[str]:
    """Check a dataset folder (finished, README.md, at least one .parquet, every ``configs:`` data_files pattern
    matching a file, linked files present, every parquet file a valid shard of episodes: columns and types, episodes
    of at least one step, finite values). Returns the files that will be uploaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Dataset folder {folder} does not exist.")
    partial = describe_partial(folder)
    if partial is not None:
        raise ValueError(partial)
    uploads = _upload_list(folder)
    problems = []
    if "README.md" not in uploads:
        problems.append("README.md (the dataset card)")
    if not any(u.endswith(".parquet") for u in uploads):
        problems.append("at least one .parquet file")
    if problems:
        raise FileNotFoundError(f"Dataset folder {folder} is incomplete, missing: " + "; ".join(problems))
    _check_card(folder, uploads)
    config_files(folder)  # every configs: pattern matches a file
    for path in uploads:
        if path.endswith(".parquet"):
            check_shard(folder / path)
    return uploads


# ---------------------------------------------------------------------------------------------------------------------
# Upload
# ---------------------------------------------------------------------------------------------------------------------
def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_unreachable(error: BaseException) -> bool:
    """A failure to reach the endpoint: connection refused, DNS, timeouts (the request errors of the HTTP client that
    huggingface_hub uses: ``httpx`` in 1.x, ``httpx2`` in 2.x), or offline mode."""
    if isinstance(error, (OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    return any(
        cls.__name__ == "RequestError" and cls.__module__.split(".")[0] in ("httpx", "httpx2")
        for cls in type(error).__mro__
    )


@contextlib.contextmanager
def _one_line_network_errors(endpoint: str, what: str) -> Iterator[None]:
    """Turn an unreachable endpoint, a rejected token or a refused request into a one-line :class:`HubPushError`."""
    try:
        yield
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise HubAuthError(f"{endpoint} rejected the token ({status}) during {what}: {_TOKEN_HELP}.") from err
        raise HubPushError(f"{endpoint} refused {what} ({status}): {_first_line(err)}") from err
    except Exception as err:
        if isinstance(err, HubPushError) or not _is_unreachable(err):
            raise
        raise HubPushError(
            f"Cannot reach the Hub at {endpoint} ({type(err).__name__}: {_first_line(err)}); check the network "
            "connection and HF_ENDPOINT."
        ) from err


def _verify_remote(api: HfApi, repo_id: str, repo_type: str, revision: str, folder: Path, uploads: list[str]) -> None:
    """Every local file is in the remote tree with the same size and hash; HubPushError otherwise."""
    remote = {
        entry.path: entry
        for entry in api.list_repo_tree(repo_id, repo_type=repo_type, revision=revision, recursive=True)
        if hasattr(entry, "size")
    }
    missing = [p for p in uploads if p not in remote]
    different = []
    for path in (p for p in uploads if p in remote):
        entry, local = remote[path], folder / path
        if entry.size != local.stat().st_size:
            different.append(path)
        elif entry.lfs is not None:
            with open(local, "rb") as f:
                if sha_fileobj(f).hex() != entry.lfs.sha256:
                    different.append(path)
        elif entry.blob_id != git_hash(local.read_bytes()):
            different.append(path)
    if missing or different:
        raise HubPushError(
            f"Upload to {repo_type} repo {repo_id}@{revision} is incomplete: missing {missing}, different {different}."
        )


def _push(
    folder: Path,
    uploads: list[str],
    repo_id: str,
    repo_type: str,
    *,
    private: bool,
    revision: str | None,
    commit_message: str,
    token: str | None,
    large_folder_bytes: int | None = None,
) -> str:
    api = HfApi()
    token = require_token(token)
    with _one_line_network_errors(api.endpoint, "the token check"):
        user = api.whoami(token=token)["name"]
    repo_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    size = sum((folder / path).stat().st_size for path in uploads)
    large = large_folder_bytes is not None and size > large_folder_bytes and hasattr(api, "upload_large_folder")
    upload = dict(repo_id=repo_id, folder_path=folder, repo_type=repo_type, revision=revision)
    with _one_line_network_errors(api.endpoint, f"the upload to {repo_type} repo {repo_id}"):
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True, token=token)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True, token=token)
        if large:  # several commits, resumable; the head commit of the revision afterwards
            api.upload_large_folder(**upload, ignore_patterns=list(IGNORE_PATTERNS), print_report=False)
            sha = api.repo_info(repo_id, repo_type=repo_type, revision=revision or "main", token=token).sha
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            url = f"{api.endpoint}/{prefix}{repo_id}/commit/{sha}"
            info = CommitInfo(commit_url=url, commit_message="upload_large_folder", commit_description="", oid=sha)
        else:
            info = api.upload_folder(
                **upload, commit_message=commit_message, token=token, ignore_patterns=list(IGNORE_PATTERNS)
            )
    with _one_line_network_errors(api.endpoint, f"the check of the uploaded {repo_type} repo {repo_id}"):
        _verify_remote(api, repo_id, repo_type, revision or "main", folder, uploads)
    return info


def push_model(
    folder_or_model: str | os.PathLike | Any,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    card: str | None = None,
) -> str:
    """Upload a model folder (or a ``PreTrainedModel``) to a Hub model repo; returns the commit URL.

    A folder must hold ``config.json``, ``model.safetensors`` (or ``model.safetensors.index.json`` and its shards)
    and ``README.md``; files the card links to must be in the folder. A model object is saved to a temporary
    folder first, with ``card`` as its README (or, without ``card``, the README.md of the folder it was loaded
    from). The repo is created if needed (``private`` only applies then) and ``revision``, a branch, is created from
    ``main`` if missing. The returned string is a ``CommitInfo`` (also carrying ``.oid``).
    """
    check_repo_id(repo_id)
    settings = dict(private=private, revision=revision, token=token)
    message = commit_message or "Upload model with harmodt_hf.push_model"
    if isinstance(folder_or_model, (str, os.PathLike)):
        if card is not None:
            raise ValueError("card= is for model objects; put README.md in the model folder instead.")
        folder = Path(folder_or_model)
        return _push(folder, validate_model_folder(folder), repo_id, "model", commit_message=message, **settings)
    if not hasattr(folder_or_model, "save_pretrained"):
        raise TypeError(f"push_model expects a folder or a PreTrainedModel, got {type(folder_or_model).__name__}")
    name_or_path = str(getattr(folder_or_model, "name_or_path", "") or "")
    source = Path(name_or_path) if name_or_path else None  # the local folder it was loaded from, if any
    if card is None and not (source is not None and (source / "README.md").is_file()):
        raise ValueError("A model card is required: pass card='...' (the README.md text) to push a model object.")
    with tempfile.TemporaryDirectory(prefix="harmodt-push-") as tmp:
        folder = Path(tmp)
        folder_or_model.save_pretrained(folder)
        if card is not None:
            (folder / "README.md").write_text(card, encoding="utf-8")
        else:  # the source folder's card and the files it links to
            for link in ["README.md", *card_links((source / "README.md").read_text(encoding="utf-8"))]:
                if ".." not in PurePosixPath(link).parts and (source / link).is_file() and not (folder / link).exists():
                    (folder / link).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source / link, folder / link)
        return _push(folder, validate_model_folder(folder), repo_id, "model", commit_message=message, **settings)


def push_dataset(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    large_folder_bytes: int = LARGE_FOLDER_BYTES,
) -> str:
    """Upload a dataset folder (README.md with ``configs:``, parquet files) to a Hub dataset repo; returns the
    commit URL (a ``CommitInfo``). Same checks and repo/branch handling as `push_model`.

    A folder over ``large_folder_bytes`` goes up with ``upload_large_folder`` where huggingface_hub has it (several
    commits; an interrupted upload resumes when the same call runs again); ``commit_message`` is not used then.
    """
    check_repo_id(repo_id)
    uploads = validate_dataset_folder(folder)
    message = commit_message or "Upload dataset with harmodt_hf.push_dataset"
    settings = dict(private=private, revision=revision, token=token, large_folder_bytes=large_folder_bytes)
    return _push(Path(folder), uploads, repo_id, "dataset", commit_message=message, **settings)
