"""Shared fixtures: one local S3 server, one local Ray cluster, one live MLflow server.

All three are real servers on 127.0.0.1, started once per session:
- `s3_server`: moto's HTTP S3 endpoint; AWS_* variables point boto3/pyarrow at it.
- `ray_cluster`: `ray start --head` (so `ray job submit` works against it) and this process
  connected as a driver; every Ray test shares it.
- `mlflow_server`: `mlflow server` over SQLite, for registry round trips over HTTP.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipelines.common import free_local_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Fake credentials for the local S3 server, set before anything (Ray workers included) starts.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Token auth must be on before Ray reads its config (at import), or this driver never sends
# the token that `ray start` (token auth on by default) asks for.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# ~/.ray/auth_token is shared by every cluster on the machine and other test sessions rewrite
# it: a private token (set before Ray caches one) keeps this session's cluster, its driver and
# its `ray job submit` subprocesses in step.
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


@pytest.fixture(autouse=True)
def _keep_mlflow_uri_env() -> Iterator[None]:
    """`mlflow.set_tracking_uri` / `set_registry_uri` (called by tests) also export
    MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI, which the pipeline and MLflow read as the user's
    choice: restore them so no test leaks its store (e.g. a live server) into the next."""
    from videobert.tracking import preserved_uri_env

    with preserved_uri_env():
        yield


free_port = free_local_port  # the pipeline's own helper (pipelines.common)


def wait_for_http(url: str, timeout: float = 60.0, server: subprocess.Popen | None = None) -> None:
    """Until `url` answers; a `server` process that exits first raises ServerExited at once."""
    deadline = time.monotonic() + timeout
    while True:
        if server is not None and server.poll() is not None:
            raise ServerExited(f"the server for {url} exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # the server answers (e.g. 401 under Ray's token auth): it is up
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


class ServerExited(RuntimeError):
    """A server process ended before it answered."""


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 endpoint over HTTP on 127.0.0.1; yields its URL (also in AWS_ENDPOINT_URL)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        server.stop()
        os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh empty bucket on the local S3 server; yields `s3://<name>`."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


# What `ray job submit --working-dir` must not upload: environments, caches, local outputs.
UPLOAD_EXCLUDES = [
    ".venv",
    ".git",
    ".torch_extensions",
    ".ruff_cache",
    ".pytest_cache",
    "out",
    "data",
    "mlruns",
    "*.egg-info",
    "__pycache__",
]


@dataclass
class RayCluster:
    address: str  # GCS address for ray.init
    dashboard_url: str  # for `ray job submit --address`
    env: dict[str, str]  # environment for `ray job submit` subprocesses

    def submit(
        self, entrypoint: list[str], env: dict[str, str] | None = None, timeout: float = 540
    ) -> subprocess.CompletedProcess[str]:
        """`ray job submit --working-dir <repo> -- <entrypoint>`, waiting for the job to end.

        The head's job agent registers some seconds after the dashboard answers (longer on a
        loaded machine); until then Ray refuses a submission with "No available agent to
        submit job, please try again later" and starts nothing, so that answer is retried.
        """
        command = [ray_bin(), "job", "submit", "--address", self.dashboard_url, "--working-dir", str(REPO)]
        command += ["--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}), "--", *entrypoint]
        deadline = time.monotonic() + 300  # under load (10+) the agent took over 180 s
        while True:
            result = subprocess.run(
                command, cwd=REPO, env=env or self.env, capture_output=True, text=True, timeout=timeout
            )
            if "No available agent" not in result.stdout + result.stderr or time.monotonic() > deadline:
                return result
            time.sleep(3)


@pytest.fixture(scope="session")
def ray_cluster(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A local `ray start --head` cluster (4 logical CPUs) with this process as its driver."""
    import ray

    port, dashboard_port = free_port(), free_port()
    env = dict(os.environ)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Let worker processes import the repo (and `tests`) the same way this process does.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # Its workers find its own state API, not whichever cluster this machine started last
    # (Ray Train's placement-group watcher asks it; see pipelines.common.init_ray).
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    log_path = tmp_path_factory.mktemp("ray") / "ray-start.log"
    # `--block` in a process group of its own: teardown stops this cluster only, never
    # another one on the same machine (as `ray stop` would).
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=4",
            "--num-gpus=0",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=open(log_path, "wb"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for_http(f"{dashboard_url}/api/version", timeout=120, server=head)
        os.environ["RAY_ADDRESS"] = address
        ray.init(address=address, log_to_driver=True)
        yield RayCluster(address=address, dashboard_url=dashboard_url, env=env)
    finally:
        # Bounded: at the end of a full suite ray.shutdown() can hang in its GCS subscriber's
        # close RPC (Ray 2.60; the whole 60 s bound in a CI run), against ~5 s when it returns.
        # Stopping the cluster below ends that wait too.
        closer = threading.Thread(target=ray.shutdown, daemon=True)
        closer.start()
        closer.join(timeout=15)
        os.environ.pop("RAY_ADDRESS", None)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=5)  # `ray start --block` can sit on SIGTERM for long
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A live `mlflow server` on 127.0.0.1 over SQLite; yields its tracking URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    process = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "wb"),  # noqa: SIM115 - closed with the process
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", timeout=120, server=process)
        yield uri
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def evaluated(ray_cluster: RayCluster, s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny corpus extracted, tokenized, an untrained model registered and evaluated
    (tests/labelled_world.py): built once, for test_evalsets and test_finetune_classify."""
    from tests.labelled_world import build_evaluated

    return build_evaluated(s3_server, tmp_path_factory)


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def ray_bin() -> str:
    return str(BIN / "ray") if (BIN / "ray").exists() else shutil.which("ray") or "ray"
