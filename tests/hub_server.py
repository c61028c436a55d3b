"""A small loopback Hugging Face Hub-protocol server for tests.

It speaks enough of the Hub HTTP protocol for the real clients (`huggingface_hub.HfApi`, `hf_hub_download`,
`HfFileSystem`, `datasets.load_dataset`, `transformers` `from_pretrained`) to create repos, upload folders (regular
files inline in the commit, large/binary files through the LFS batch API) and read them back. It runs on
`http.server.ThreadingHTTPServer`, bound to 127.0.0.1 on a free port, and keeps repositories in a folder:

    <root>/objects/<sha256>                     file contents, content-addressed (regular and LFS files alike)
    <root>/repos/<type>s/<namespace>/<name>.json  branches, commits and file tables of one repo

Endpoints (see the `_ROUTES` table): whoami, validate-yaml, repo create/delete, repo info (``/revision/{rev}``),
tree listing (recursive, expand, cursor pagination with a ``Link`` header), paths-info, refs, commits, branch
creation, preupload, commit (NDJSON), the LFS batch API (basic upload, then PUT to a one-time ticket URL, and a
verify action) and resolve (GET/HEAD, byte ranges, ``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``/``X-Linked-Size``).

Auth: one user (``user``) holding one valid token (``token``), plus the organisations in ``orgs``. Writes always need
the token; reads of private repos need it; with ``auth_required=True`` every request but the ticketed LFS PUT needs
it (401 otherwise). A wrong token is always a 401 with the Hub's ``Invalid credentials in Authorization header``.

Not the real Hub: no Xet, no pull requests, no tags, no gitignore handling, no rate limits, LFS objects are shared
by all repos, and LFS files are served directly (200) instead of redirecting to a CDN.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

REPO_TYPES = ("model", "dataset")
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
# Extensions the Hub's default .gitattributes tracks with LFS (a subset, enough for ML artefacts).
LFS_EXTENSIONS = (
    ".7z .arrow .bin .bz2 .ckpt .ftz .gz .h5 .joblib .mlmodel .model .msgpack .npy .npz .onnx .ot .parquet .pb .pickle "
    ".pkl .pt .pth .rar .safetensors .tar .tflite .tgz .wasm .xz .zip .zst .png .jpg .jpeg .gif .webp .mp4 .mp3 .wav"
).split()
GITATTRIBUTES = "".join(f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in LFS_EXTENSIONS).encode()
_NAME_RE = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_SEG = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_OID_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{7,40}$")
_MAX_OPS_PER_COMMIT = 100_000
_READ_CHUNK = 1 << 20


def _now() -> str:
    """Hub-style UTC timestamp (``%Y-%m-%dT%H:%M:%S.%fZ`` with milliseconds)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(data: bytes) -> str:
    """Git's blob id of ``data`` (sha1 of ``blob <len>\\0<data>``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    """The git-lfs pointer file stored in git for an LFS file."""
    return LFS_POINTER.format(oid=oid, size=size).encode()


class HubError(Exception):
    """An error answered as JSON ``{"error": message}`` with the Hub's ``X-Error-*`` headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class FileEntry:
    """One file of a commit's tree."""

    sha256: str
    size: int
    lfs: bool
    git_oid: str  # git blob id (of the pointer file for LFS files)
    commit: str  # last commit that touched the file


@dataclass
class Commit:
    """A commit: full file table (path -> FileEntry), parent and message."""

    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, FileEntry] = field(default_factory=dict)


@dataclass
class Repo:
    """A repository: branches pointing at commits."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    @property
    def url_prefix(self) -> str:
        return "datasets/" if self.repo_type == "dataset" else ""


@dataclass
class _Ticket:
    oid: str
    size: int
    expires: float


class HubServer:
    """Loopback Hub-protocol server. Use as a context manager or call `start()` / `stop()`.

    Args:
        root: folder for repos and objects (a fresh temp folder, removed on `stop()`, when None).
        token: the one valid user access token.
        user: the user's name (namespace); `orgs` are extra namespaces the user may write to.
        auth_required: answer 401 to any request without a valid token (not just writes and private reads).
        lfs_threshold: files at least this large go through LFS (the Hub uses 10 MB); binary samples and
            LFS-tracked extensions always do.
        max_body: largest request body accepted (413 beyond).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        token: str = "hf_loopback_test_token",
        user: str = "test-user",
        orgs: tuple[str, ...] = ("test-org",),
        auth_required: bool = False,
        lfs_threshold: int = 10 * 1024 * 1024,
        max_body: int = 1 << 30,
        tree_page_size: int = 1000,
    ):
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="hub-server-")) if root is None else Path(root)
        self.objects_dir = self.root / "objects"
        self.repos_dir = self.root / "repos"
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.repos_dir.mkdir(parents=True, exist_ok=True)
        self.token, self.user, self.orgs = token, user, tuple(orgs)
        self.auth_required = auth_required
        self.lfs_threshold = lfs_threshold
        self.max_body = max_body
        self.tree_page_size = tree_page_size
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: deque[tuple[str, str, int]] = deque(maxlen=10_000)  # (method, path, status), latest last
        self.request_count = 0  # all requests answered, never truncated
        self.unhandled: deque[tuple[str, str]] = deque(maxlen=1_000)  # requests no route matched
        self._tickets: dict[str, _Ticket] = {}
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (what `HF_ENDPOINT` should be)."""
        if self._httpd is None:
            raise RuntimeError("server not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        """Bind 127.0.0.1 on a free port and serve in a daemon thread."""
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.hub = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and remove the temp root (if this server made it)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._httpd = self._thread = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection helpers for tests
    def repo_ids(self, repo_type: str = "model") -> list[str]:
        """Ids of the repos of one type that exist on the server."""
        with self._lock:
            return sorted(rid for (rtype, rid) in self.repos if rtype == repo_type)

    def list_files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[str]:
        """Paths of the files at `revision`."""
        with self._lock:
            return sorted(self._commit(self._repo(repo_type, repo_id), revision).files)

    def read_file(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> bytes:
        """Content of one file at `revision`."""
        with self._lock:
            entry = self._commit(self._repo(repo_type, repo_id), revision).files[path]
        return self._object_path(entry.sha256).read_bytes()

    def stored_objects(self) -> list[str]:
        """sha256 of every object in the store (uploaded LFS objects included, committed or not)."""
        return sorted(p.name for p in self.objects_dir.iterdir() if _OID_RE.match(p.name))

    def reset(self) -> None:
        """Delete every repo and object (between tests that need an empty server)."""
        with self._lock:
            self.repos.clear()
            self._tickets.clear()
            shutil.rmtree(self.objects_dir, ignore_errors=True)
            shutil.rmtree(self.repos_dir, ignore_errors=True)
            self.objects_dir.mkdir(parents=True)
            self.repos_dir.mkdir(parents=True)

    def _log(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))
            self.request_count += 1

    # ------------------------------------------------------------------ storage
    def _object_path(self, sha256: str) -> Path:
        return self.objects_dir / sha256

    def _store_object(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self._object_path(sha)
        if not path.exists():
            tmp = path.with_name(f".{sha}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha

    def _persist(self, repo: Repo) -> None:
        path = self.repos_dir / f"{repo.repo_type}s" / f"{repo.repo_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(repo), indent=1))
        os.replace(tmp, path)

    def _new_oid(self, *parts: str) -> str:
        with self._lock:
            self._counter += 1
            counter = self._counter
        return hashlib.sha1("\0".join((*parts, str(counter), str(time.time_ns()))).encode()).hexdigest()

    def _repo(self, repo_type: str, repo_id: str, *, auth: bool = True) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not auth):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        revision = revision or "main"
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if _COMMIT_RE.match(revision):
            matches = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return repo.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def classify(self, path: str, size: int, sample: bytes) -> str:
        """Upload mode of a file, as the Hub decides it: ``"lfs"`` or ``"regular"``."""
        if size >= self.lfs_threshold or path.lower().endswith(tuple(LFS_EXTENSIONS)) or b"\0" in sample:
            return "lfs"
        try:
            sample.decode("utf-8")
        except UnicodeDecodeError as err:
            if err.start < len(sample) - 4:  # not just a multi-byte char cut at the sample's end
                return "lfs"
        return "regular"

    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        date = _now()
        oid = self._new_oid(repo_type, repo_id, "initial")
        sha = self._store_object(GITATTRIBUTES)
        files = {
            ".gitattributes": FileEntry(sha, len(GITATTRIBUTES), False, git_blob_oid(GITATTRIBUTES), oid),
        }
        repo = Repo(repo_type, repo_id, private, date, {"main": oid})
        repo.commits[oid] = Commit(oid, None, "initial commit", "", date, files)
        self.repos[(repo_type, repo_id)] = repo
        self._persist(repo)
        return repo


def _validate_path(path: Any) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or path.endswith("/"):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] == ".git" or "\0" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _header_value(value: str) -> str:
    """A header value http.server can send: one line, latin-1."""
    return str(value).replace("\r", " ").replace("\n", " ").encode("latin-1", "replace").decode("latin-1")


def _tree_oid(paths: list[tuple[str, str]]) -> str:
    return hashlib.sha1("\n".join(f"{p} {o}" for p, o in sorted(paths)).encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to a `HubServer` method. Bodies are always read in full (bounded) before routing."""

    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections are closed after this many seconds
    server_version = "LoopbackHub/1.0"

    hub: HubServer
    authed: bool
    body: bytes
    query: dict[str, list[str]]

    # ---------------------------------------------------------------- plumbing
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        """Read a Content-Length or chunked body, at most `max_body` bytes."""
        limit = self.hub.max_body
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts, total = [], 0
            while True:  # one iteration per chunk; bounded by `limit`
                line = self.rfile.readline(1024)
                if not line:
                    raise HubError(400, "Truncated chunked body")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    for _ in range(100):  # optional trailer lines, then the blank line that ends the body
                        if not self.rfile.readline(1024).strip():
                            return b"".join(parts)
                    raise HubError(400, "Too many trailers in chunked body")
                total += size
                if total > limit:
                    self.close_connection = True
                    raise HubError(413, "Request body too large")
                parts.append(self.rfile.read(size))
                self.rfile.readline(16)  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            self.close_connection = True
            raise HubError(413, "Request body too large")
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, content_type: str | None = None
    ) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, _header_value(value))
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self.hub._log(self.command, self.path, status)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers, "application/json; charset=utf-8")

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json(err.status, {"error": err.message}, headers)

    def _dispatch(self, method: str) -> None:
        self.hub = self.server.hub  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        self.body = b""
        body_read = False
        try:
            self.body = self._read_body()
            body_read = True
            self._authenticate(split.path)
            for route_method, pattern, handler in _ROUTES:
                if method == route_method or (method == "HEAD" and route_method == "GET"):
                    match = pattern.fullmatch(split.path)
                    if match:
                        handler(self, **match.groupdict())
                        return
            self.hub.unhandled.append((method, self.path))
            raise HubError(404, f"Unknown endpoint for the loopback Hub: {method} {split.path}")
        except (BrokenPipeError, ConnectionResetError):  # the client went away mid-response
            self.close_connection = True
        except HubError as err:
            self.close_connection = self.close_connection or not body_read
            self._error(err)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
            self.close_connection = self.close_connection or not body_read
            self._error(HubError(400, f"Bad request: {type(err).__name__}: {err}"))
        except Exception as err:  # a bug in the server: answer 500 rather than dropping the connection
            self.close_connection = True
            self._error(HubError(500, f"Loopback Hub internal error: {type(err).__name__}: {err}"))

    def _authenticate(self, path: str) -> None:
        header = self.headers.get("Authorization", "")
        self.authed = False
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or value.strip() != self.hub.token:
                raise HubError(401, "Invalid credentials in Authorization header")
            self.authed = True
        elif self.hub.auth_required and not path.startswith("/__lfs__/upload/"):
            # Like the Hub for private repos: 401 + RepoNotFound on repo URLs (huggingface_hub only maps a bare 401
            # to RepositoryNotFoundError for https endpoints, so the code must be explicit here).
            code = "RepoNotFound" if re.match(r"/api/(models|datasets)/|.*/resolve/", path) else None
            raise HubError(401, "Unauthorized: a valid token is required (Authorization: Bearer <token>)", code)

    def _require_write(self, namespace: str | None = None) -> None:
        if not self.authed:
            raise HubError(401, "You must be authenticated to write (Authorization: Bearer <token>)")
        if namespace is not None and namespace not in (self.hub.user, *self.hub.orgs):
            raise HubError(403, f"You don't have the rights to write to the namespace {namespace!r}")

    def _body_json(self) -> Any:
        return json.loads(self.body.decode() or "null")

    def _flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true", "yes")

    def _base(self) -> str:
        return self.hub.url

    # ---------------------------------------------------------------- account and misc
    def whoami(self) -> None:
        if not self.authed:
            raise HubError(401, "Invalid username or password.")
        hub = self.hub
        self._json(
            200,
            {
                "type": "user",
                "id": "0" * 24,
                "name": hub.user,
                "fullname": "Loopback Test User",
                "email": f"{hub.user}@example.invalid",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "admin"} for org in hub.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "loopback", "role": "write"}},
            },
        )

    def agent_harnesses(self) -> None:
        self._json(200, {"standardEnvVars": [], "harnesses": {}})

    def validate_yaml(self) -> None:
        import yaml

        content = (self._body_json() or {}).get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        if match:
            try:
                data = yaml.safe_load(match.group(1))
            except yaml.YAMLError as err:
                self._json(400, {"errors": [{"message": f"Invalid YAML: {err}"}], "warnings": []})
                return
            if data is not None and not isinstance(data, dict):
                self._json(400, {"errors": [{"message": "YAML metadata must be a mapping"}], "warnings": []})
                return
        self._json(200, {"errors": [], "warnings": []})

    # ---------------------------------------------------------------- repos
    def create_repo(self) -> None:
        payload = self._body_json() or {}
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Unsupported repo type for the loopback Hub: {repo_type!r}")
        namespace = payload.get("organization") or self.hub.user
        name = payload.get("name", "")
        self._require_write(namespace)
        if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(".git"):
            raise HubError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{namespace}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        prefix = "datasets/" if repo_type == "dataset" else ""
        url = f"{self._base()}/{prefix}{repo_id}"
        with self.hub._lock:
            exists = (repo_type, repo_id) in self.hub.repos
            if not exists:
                self.hub._create_repo(repo_type, repo_id, private)
        if exists:  # the client's exist_ok path reads "url" from this 409 body
            message = f"You already created this {repo_type} repo"
            self._json(409, {"error": message, "url": url}, {"X-Error-Message": message})
            return
        self._json(200, {"url": url, "name": repo_id, "id": self.hub._new_oid(repo_id)[:24]})

    def delete_repo(self) -> None:
        payload = self._body_json() or {}
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or self.hub.user
        self._require_write(namespace)
        repo_id = f"{namespace}/{payload.get('name', '')}"
        with self.hub._lock:
            self.hub._repo(repo_type, repo_id)
            del self.hub.repos[(repo_type, repo_id)]
            (self.hub.repos_dir / f"{repo_type}s" / f"{repo_id}.json").unlink(missing_ok=True)
        self._json(200, {})

    def repo_info(self, rtype: str, repo: str, rev: str | None = None) -> None:
        import yaml

        repo_type = rtype[:-1]
        with self.hub._lock:
            r = self.hub._repo(repo_type, repo, auth=self.authed)
            commit = self.hub._commit(r, unquote(rev) if rev else "main")
            files = dict(commit.files)
        blobs = self._flag("blobs")
        siblings = []
        for path, entry in sorted(files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs:
                    pointer = len(lfs_pointer(entry.sha256, entry.size))
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": pointer}
            siblings.append(sibling)
        card_data = None
        if "README.md" in files:
            text = self.hub._object_path(files["README.md"].sha256).read_text(encoding="utf-8", errors="replace")
            match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
            if match:
                try:
                    loaded = yaml.safe_load(match.group(1))
                    card_data = loaded if isinstance(loaded, dict) else None
                except yaml.YAMLError:
                    card_data = None
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
            "id": repo,
            "author": repo.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": r.created_at,
            "private": r.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if card_data is not None:
            info["cardData"] = card_data
        if blobs:
            info["usedStorage"] = sum(e.size for e in files.values())
        self._json(200, info)

    def refs(self, rtype: str, repo: str) -> None:
        with self.hub._lock:
            r = self.hub._repo(rtype[:-1], repo, auth=self.authed)
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in r.branches.items()]
        self._json(200, {"branches": branches, "converts": [], "tags": []})

    def commits(self, rtype: str, repo: str, rev: str) -> None:
        with self.hub._lock:
            r = self.hub._repo(rtype[:-1], repo, auth=self.authed)
            commit: Commit | None = self.hub._commit(r, unquote(rev))
            out = []
            for _ in range(len(r.commits)):  # bounded walk to the root commit
                if commit is None:
                    break
                out.append(
                    {
                        "id": commit.oid,
                        "title": commit.title,
                        "message": commit.message,
                        "date": commit.date,
                        "authors": [{"user": self.hub.user}],
                    }
                )
                commit = r.commits.get(commit.parent) if commit.parent else None
        self._json(200, out)

    def create_branch(self, rtype: str, repo: str, branch: str) -> None:
        branch = unquote(branch)
        with self.hub._lock:
            r = self.hub._repo(rtype[:-1], repo, auth=self.authed)
            self._require_write(repo.split("/")[0])
            if branch in r.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,99}", branch) or ".." in branch:
                raise HubError(400, f"Invalid branch name: {branch!r}")
            start = (self._body_json() or {}).get("startingPoint") or "main"
            r.branches[branch] = self.hub._commit(r, start).oid
            self.hub._persist(r)
        self._json(200, {})

    # ---------------------------------------------------------------- tree and paths-info
    def _entries(self, commit: Commit) -> tuple[dict[str, FileEntry], dict[str, set[str]]]:
        """Files of a commit and, for every folder ('' = root), its direct children (files and folders)."""
        children: dict[str, set[str]] = {"": set()}
        for path in commit.files:
            parts = path.split("/")
            for depth in range(len(parts)):
                parent = "/".join(parts[:depth])
                children.setdefault(parent, set()).add("/".join(parts[: depth + 1]))
        return commit.files, children

    def _entry_json(
        self, path: str, files: dict[str, FileEntry], commits: dict[str, Commit], expand: bool
    ) -> dict[str, Any]:
        if path in files:
            entry = files[path]
            out: dict[str, Any] = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
            if entry.lfs:
                pointer = len(lfs_pointer(entry.sha256, entry.size))
                out["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": pointer}
            last = [entry.commit]
        else:
            inside = [(p, e) for p, e in files.items() if p.startswith(path + "/")]
            out = {"type": "directory", "oid": _tree_oid([(p, e.git_oid) for p, e in inside]), "size": 0, "path": path}
            last = [e.commit for _, e in inside]
        if expand:
            latest = max((commits[c] for c in last if c in commits), key=lambda c: c.date, default=None)
            if latest is not None:
                out["lastCommit"] = {"id": latest.oid, "title": latest.title, "date": latest.date}
            if out["type"] == "file":
                out["securityFileStatus"] = {"status": "safe", "avScan": None, "pickleImportScan": None}
        return out

    def tree(self, rtype: str, repo: str, rev: str, path: str | None = None) -> None:
        path = unquote(path or "").strip("/")
        recursive, expand = self._flag("recursive"), self._flag("expand")
        with self.hub._lock:
            r = self.hub._repo(rtype[:-1], repo, auth=self.authed)
            commit = self.hub._commit(r, unquote(rev))
            files, children = self._entries(commit)
            if path not in children:
                raise HubError(404, f"Entry not found: {path!r} is not a folder at {rev}", "EntryNotFound")
            if recursive:
                prefix = path + "/" if path else ""
                paths = sorted(p for p in children if p and p.startswith(prefix))
                paths += sorted(p for p in files if p.startswith(prefix))
                paths = sorted(set(paths))
            else:
                paths = sorted(children[path])
            page_size = max(1, self.hub.tree_page_size // (20 if expand else 1))
            cursor = int(self.query.get("cursor", ["0"])[-1])
            page = paths[cursor : cursor + page_size]
            out = [self._entry_json(p, files, r.commits, expand) for p in page]
        headers = {}
        if cursor + page_size < len(paths):
            query = f"recursive={str(recursive).lower()}&expand={str(expand).lower()}&cursor={cursor + page_size}"
            quoted = "/" + quote(path, safe="") if path else ""
            next_url = f"{self._base()}/api/{rtype}/{repo}/tree/{rev}{quoted}?{query}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._json(200, out, headers)

    def paths_info(self, rtype: str, repo: str, rev: str) -> None:
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            payload = self._body_json() or {}
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(self.body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = form.get("expand", ["false"])[-1].lower() in ("1", "true")
        paths = [paths] if isinstance(paths, str) else paths
        with self.hub._lock:
            r = self.hub._repo(rtype[:-1], repo, auth=self.authed)
            commit = self.hub._commit(r, unquote(rev))
            files, children = self._entries(commit)
            out = [
                self._entry_json(p.strip("/"), files, r.commits, expand)
                for p in paths
                if p.strip("/") in files or (p.strip("/") and p.strip("/") in children)
            ]
        self._json(200, out)

    # ---------------------------------------------------------------- upload: preupload, LFS, commit
    def preupload(self, rtype: str, repo: str, rev: str) -> None:
        if self._flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by the loopback Hub")
        payload = self._body_json() or {}
        with self.hub._lock:
            r = self.hub._repo(rtype[:-1], repo, auth=self.authed)
            self._require_write(repo.split("/")[0])
            commit = self.hub._commit(r, unquote(rev))
            out = []
            for item in payload.get("files", []):
                path = _validate_path(item.get("path"))
                sample = base64.b64decode(item.get("sample", ""))
                mode = self.hub.classify(path, int(item.get("size", 0)), sample)
                existing = commit.files.get(path)
                oid = None if existing is None else (existing.sha256 if existing.lfs else existing.git_oid)
                out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": out, "commitOid": commit.oid})

    def lfs_batch(self, prefix: str | None, repo: str) -> None:
        repo_type = "dataset" if prefix else "model"
        payload = self._body_json() or {}
        with self.hub._lock:
            self.hub._repo(repo_type, repo, auth=self.authed)
        self._require_write(repo.split("/")[0])
        if payload.get("operation") != "upload":
            raise HubError(400, "The loopback Hub only supports the 'upload' LFS batch operation")
        transfers = payload.get("transfers") or ["basic"]
        if "basic" not in transfers:
            raise HubError(400, f"No supported transfer adapter in {transfers} (only 'basic')")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _OID_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append(
                    {"oid": str(oid), "size": int(size or 0), "error": {"code": 422, "message": "Invalid object"}}
                )
                continue
            stored = self.hub._object_path(oid)
            if stored.exists() and stored.stat().st_size == size:
                objects.append({"oid": oid, "size": size})  # already present: no action
                continue
            ticket = secrets.token_urlsafe(24)
            with self.hub._lock:
                self.hub._tickets[ticket] = _Ticket(oid, size, time.time() + 3600)
            base = self._base()
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{base}/__lfs__/upload/{oid}?ticket={ticket}", "expires_in": 3600},
                        "verify": {"href": f"{base}/__lfs__/verify", "expires_in": 3600},
                    },
                }
            )
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def lfs_upload(self, oid: str) -> None:
        ticket_id = self.query.get("ticket", [""])[-1]
        with self.hub._lock:
            ticket = self.hub._tickets.get(ticket_id)
        if ticket is None or ticket.oid != oid or ticket.expires < time.time():
            raise HubError(403, "Invalid or expired LFS upload ticket")
        if len(self.body) != ticket.size:
            raise HubError(400, f"Size mismatch: expected {ticket.size} bytes, got {len(self.body)}")
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "sha256 mismatch: uploaded content does not match the announced oid")
        self.hub._store_object(self.body)
        with self.hub._lock:
            self.hub._tickets.pop(ticket_id, None)
        self._send(200, headers={"ETag": f'"{oid}"'})

    def lfs_verify(self) -> None:
        self._require_write()
        payload = self._body_json() or {}
        path = self.hub._object_path(str(payload.get("oid", "")))
        if not _OID_RE.match(path.name) or not path.exists() or path.stat().st_size != payload.get("size"):
            raise HubError(404, "LFS object not found")
        self._json(200, {"success": True})

    def commit(self, rtype: str, repo: str, rev: str) -> None:
        if self._flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by the loopback Hub")
        repo_type, revision = rtype[:-1], unquote(rev)
        lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "A commit must start with a 'header' line")
        if len(lines) > _MAX_OPS_PER_COMMIT:
            raise HubError(400, "Too many operations in one commit")
        header = lines[0]["value"]
        summary = header.get("summary") or ""
        if not summary:
            raise HubError(400, "Commit summary must not be empty")
        with self.hub._lock:
            r = self.hub._repo(repo_type, repo, auth=self.authed)
            self._require_write(repo.split("/")[0])
            if revision not in r.branches:
                raise HubError(404, f"Branch not found: {revision}", "RevisionNotFound")
            parent = r.commits[r.branches[revision]]
            if header.get("parentCommit") and not parent.oid.startswith(header["parentCommit"]):
                raise HubError(412, "A commit has happened since: parentCommit is not the head of the branch")
            oid = self.hub._new_oid(repo, revision, summary)
            files = dict(parent.files)
            for line in lines[1:]:
                self._apply(line, files, oid)
            commit = Commit(oid, parent.oid, summary, header.get("description") or "", _now(), files)
            r.commits[oid] = commit
            r.branches[revision] = oid
            self.hub._persist(r)
        url = f"{self._base()}/{r.url_prefix}{repo}/commit/{oid}"
        self._json(200, {"success": True, "commitOid": oid, "commitUrl": url, "hookOutput": "", "pullRequestUrl": None})

    def _apply(self, line: dict[str, Any], files: dict[str, FileEntry], oid: str) -> None:
        key, value = line.get("key"), line.get("value") or {}
        path = _validate_path(value.get("path"))
        if key == "file":
            encoding = value.get("encoding")
            content = value.get("content", "")
            data = base64.b64decode(content, validate=True) if encoding == "base64" else content.encode()
            if self.hub.classify(path, len(data), data[:512]) == "lfs" and len(data) > 0:
                raise HubError(400, f"Your push was rejected: {path!r} must be uploaded with git-lfs")
            sha = self.hub._store_object(data)
            files[path] = FileEntry(sha, len(data), False, git_blob_oid(data), oid)
        elif key == "lfsFile":
            if value.get("algo", "sha256") != "sha256":
                raise HubError(400, "Only sha256 LFS objects are supported")
            lfs_oid = str(value.get("oid", ""))
            stored = self.hub._object_path(lfs_oid)
            if not _OID_RE.match(lfs_oid) or not stored.exists():
                raise HubError(422, f"LFS object {lfs_oid} for {path!r} was not uploaded")
            size = stored.stat().st_size
            if value.get("size") is not None and int(value["size"]) != size:
                raise HubError(422, f"LFS object {lfs_oid} has size {size}, not {value['size']}")
            files[path] = FileEntry(lfs_oid, size, True, git_blob_oid(lfs_pointer(lfs_oid, size)), oid)
        elif key == "deletedFile":
            if path not in files:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            del files[path]
        elif key == "deletedFolder":
            doomed = [p for p in files if p.startswith(path.rstrip("/") + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise HubError(400, f"Unsupported commit operation: {key!r}")

    # ---------------------------------------------------------------- download
    def resolve(self, prefix: str | None, repo: str, rev: str, path: str) -> None:
        repo_type = "dataset" if prefix else "model"
        path = unquote(path)
        with self.hub._lock:
            r = self.hub._repo(repo_type, repo, auth=self.authed)
            commit = self.hub._commit(r, unquote(rev))
            entry = commit.files.get(path)
        commit_header = {"X-Repo-Commit": commit.oid}
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit_header)
        etag = entry.sha256 if entry.lfs else entry.git_oid
        headers = {
            **commit_header,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        start, end, status = 0, entry.size - 1, 200
        range_header = self.headers.get("Range")
        if range_header and entry.size > 0:
            match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", range_header)
            if not match or (not match.group(1) and not match.group(2)):
                raise HubError(416, "Invalid range", headers={**headers, "Content-Range": f"bytes */{entry.size}"})
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), entry.size - 1) if match.group(2) else entry.size - 1
            else:  # suffix range: the last N bytes
                start = max(entry.size - int(match.group(2)), 0)
            if start >= entry.size or start > end:
                raise HubError(
                    416, "Range not satisfiable", headers={**headers, "Content-Range": f"bytes */{entry.size}"}
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = max(end - start + 1, 0)
        headers["Content-Length"] = str(length)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        for key, value in headers.items():
            self.send_header(key, _header_value(value))
        self.end_headers()
        if self.command != "HEAD" and length:
            with open(self.hub._object_path(entry.sha256), "rb") as f:
                f.seek(start)
                remaining = length
                while remaining > 0:  # bounded by the file size
                    chunk = f.read(min(_READ_CHUNK, remaining))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
        self.hub._log(self.command, self.path, status)


_REPO = rf"(?P<repo>{_SEG}/{_SEG})"
_API = rf"/api/(?P<rtype>models|datasets)/{_REPO}"
_ROUTES: list[tuple[str, re.Pattern[str], Callable[..., None]]] = [
    ("GET", re.compile(r"/api/whoami-v2"), _Handler.whoami),
    ("GET", re.compile(r"/api/agent-harnesses"), _Handler.agent_harnesses),
    ("POST", re.compile(r"/api/validate-yaml"), _Handler.validate_yaml),
    ("POST", re.compile(r"/api/repos/create"), _Handler.create_repo),
    ("DELETE", re.compile(r"/api/repos/delete"), _Handler.delete_repo),
    ("GET", re.compile(rf"{_API}(?:/revision/(?P<rev>[^/]+))?"), _Handler.repo_info),
    ("GET", re.compile(rf"{_API}/refs"), _Handler.refs),
    ("GET", re.compile(rf"{_API}/commits/(?P<rev>[^/]+)"), _Handler.commits),
    ("POST", re.compile(rf"{_API}/branch/(?P<branch>[^/]+)"), _Handler.create_branch),
    ("GET", re.compile(rf"{_API}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), _Handler.tree),
    ("POST", re.compile(rf"{_API}/paths-info/(?P<rev>[^/]+)"), _Handler.paths_info),
    ("POST", re.compile(rf"{_API}/preupload/(?P<rev>[^/]+)"), _Handler.preupload),
    ("POST", re.compile(rf"{_API}/commit/(?P<rev>[^/]+)"), _Handler.commit),
    ("POST", re.compile(rf"/(?P<prefix>datasets/)?{_REPO}\.git/info/lfs/objects/batch"), _Handler.lfs_batch),
    ("PUT", re.compile(r"/__lfs__/upload/(?P<oid>[0-9a-f]{64})"), _Handler.lfs_upload),
    ("POST", re.compile(r"/__lfs__/verify"), _Handler.lfs_verify),
    ("GET", re.compile(rf"/(?P<prefix>datasets/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), _Handler.resolve),
]
