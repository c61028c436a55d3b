"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from hub_server import HubServer

# The test models are tiny: one torch thread is faster than two, and two collapse on a busy 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
# A fresh goal-list cache per session (inherited by env workers and subprocesses), never the user's.
os.environ["HARMODT_HF_CACHE"] = tempfile.mkdtemp(prefix="harmodt-hf-test-cache-")

# ----------------------------------------------------------------------------------------------------------------------
# Loopback Hub: `hub_server` (tests/hub_server.py)
#
# Sets the environment a Hub user would (HF_ENDPOINT, HF_TOKEN, HF_HUB_DISABLE_XET=1, a temp HF_HOME / HF_HUB_CACHE /
# HF_DATASETS_CACHE, telemetry off) AND patches the module constants that huggingface_hub, datasets and transformers
# computed from the environment at import time — changing os.environ alone has no effect once they are imported:
#   huggingface_hub.constants: ENDPOINT and HUGGINGFACE_CO_URL_TEMPLATE (hf_hub_url builds resolve URLs from the
#     template, so both must move together), HF_URL_HOSTS, HF_HUB_DISABLE_XET (else hf_xet, installed here, takes
#     over uploads/downloads), HF_HUB_DISABLE_TELEMETRY (else the user-agent builder fetches {ENDPOINT}/api/agent-
#     harnesses), HF_HUB_OFFLINE, the cache/token paths (HF_HOME, HF_HUB_CACHE, HF_TOKEN_PATH, ...).
#   huggingface_hub.hf_api.api.endpoint: the module-level HfApi behind `huggingface_hub.create_repo` & co. copied
#     ENDPOINT when it was built.
#   transformers.utils.hub._hf_api: transformers' shared HfApi (same problem), reset to None so it is rebuilt.
#   datasets.config: HF_ENDPOINT, HUB_DATASETS_URL, the dataset caches, HF_HUB_OFFLINE, and two switches that would
#     reach the real internet: HF_UPDATE_DOWNLOAD_COUNTS (a HEAD to s3.amazonaws.com on every load_dataset) and
#     USE_PARQUET_EXPORT (queries "datasets-server.<HF_ENDPOINT host>").
#   The shared httpx client of huggingface_hub is rebuilt with a request hook that refuses any host but 127.0.0.1,
#   so a test that would touch the real network fails loudly instead. HfFileSystem's instance cache is cleared.
# Everything is restored when the session ends. Tests may toggle `hub_server.auth_required` (via monkeypatch) and
# use its inspection helpers (`repo_ids`, `list_files`, `stored_objects`, `requests`, `unhandled`).
# ----------------------------------------------------------------------------------------------------------------------


def _loopback_only(request) -> None:
    """httpx request hook: refuse anything but the loopback Hub."""
    if request.url.host != "127.0.0.1":
        raise RuntimeError(f"Test tried to reach {request.url} outside the loopback Hub")


def _redirect_to_loopback(mp: pytest.MonkeyPatch, server: HubServer, home: Path) -> None:
    """Point huggingface_hub / datasets / transformers at `server` (see the comment above)."""
    import datasets.config as dconfig
    import huggingface_hub.constants as hc
    from huggingface_hub import hf_api
    from huggingface_hub.utils import _cache_assets, _cache_manager, _http

    url = server.url
    hub_cache, assets, xet = home / "hub", home / "assets", home / "xet"
    ds_cache = home / "datasets"
    env = {
        "HF_ENDPOINT": url,
        "HF_TOKEN": server.token,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(assets),
        "HF_XET_CACHE": str(xet),
        "HF_DATASETS_CACHE": str(ds_cache),
        "HF_TOKEN_PATH": str(home / "token"),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for key, value in env.items():
        mp.setenv(key, value)
    for key in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_OIDC_RESOURCE",
        "HUGGINGFACE_CO_STAGING",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    ):
        mp.delenv(key, raising=False)

    for name, value in {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": hc.HF_URL_HOSTS | {urlsplit(url).hostname},
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(assets),
        "HUGGINGFACE_ASSETS_CACHE": str(assets),
        "HF_XET_CACHE": str(xet),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
    }.items():
        mp.setattr(hc, name, value)
    mp.setattr(_cache_manager, "HF_HUB_CACHE", str(hub_cache))
    mp.setattr(_cache_assets, "HF_ASSETS_CACHE", str(assets))
    mp.setattr(hf_api.api, "endpoint", url)

    for name, value in {
        "HF_ENDPOINT": url,
        "HUB_DATASETS_URL": url + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_CACHE_HOME": str(home),
        "HF_DATASETS_CACHE": ds_cache,
        "DOWNLOADED_DATASETS_PATH": ds_cache / "downloads",
        "EXTRACTED_DATASETS_PATH": ds_cache / "downloads" / "extracted",
        "HF_MODULES_CACHE": home / "modules",
        "HF_HUB_OFFLINE": False,
        "HF_DATASETS_OFFLINE": False,
        "HF_UPDATE_DOWNLOAD_COUNTS": False,
        "USE_PARQUET_EXPORT": False,
    }.items():
        mp.setattr(dconfig, name, value)

    if "transformers.utils.hub" in sys.modules:
        mp.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None, raising=False)  # newer transformers

    default_factory = _http._GLOBAL_CLIENT_FACTORY

    def guarded_factory():
        client = default_factory()
        client.event_hooks = {**client.event_hooks, "request": [*client.event_hooks["request"], _loopback_only]}
        return client

    mp.setattr(_http, "_GLOBAL_CLIENT_FACTORY", guarded_factory)  # restored on teardown
    _http.close_session()  # the next get_session() builds a guarded client


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A running loopback Hub with the process redirected to it for the whole session."""
    from huggingface_hub import HfFileSystem
    from huggingface_hub.utils import _http

    server = HubServer(tmp_path_factory.mktemp("hub-storage")).start()
    home = tmp_path_factory.mktemp("hf-home")
    try:
        with pytest.MonkeyPatch.context() as mp:
            _redirect_to_loopback(mp, server, home)
            HfFileSystem.clear_instance_cache()
            try:
                yield server
            finally:
                HfFileSystem.clear_instance_cache()
                _http.close_session()
                if "transformers.utils.hub" in sys.modules:
                    sys.modules["transformers.utils.hub"]._hf_api = None
    finally:
        server.stop()
        _http.close_session()


# ----------------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------------
# Generated Meta-World data for training/evaluation tests: `generated_dataset` (3 easy tasks × 4 expert-to-random
# episodes, made once per session with the project's own generator).
# ----------------------------------------------------------------------------------------------------------------------
GENERATED_TASKS = ["button-press-topdown-v3", "drawer-close-v3", "reach-v3"]  # canonical MT50 order


@pytest.fixture(scope="session")
def generated_dataset(tmp_path_factory) -> Path:
    from harmodt_hf.data.generation import generate_dataset

    folder = tmp_path_factory.mktemp("generated") / "mt-small"
    generate_dataset(folder, GENERATED_TASKS, 4, seed=0, num_workers=1, progress=False)
    return folder


@pytest.fixture
def one_torch_thread():
    """Single-threaded CPU kernels: on the AMX Xeon their results did not depend on the batch size (bit-exact at batch
    30, whereas 2 threads changed the last bits, ~3e-7); on an AVX2 EPYC small matmuls follow the row count even at
    one thread (see helpers.small_matmuls_follow_row_count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
