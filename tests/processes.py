"""Real process deaths for fault tests: SIGKILL the processes whose command line names a task."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def processes_running(fragment: str) -> list[int]:
    """PIDs whose command line (Ray sets it to `ray::<task>`) contains `fragment`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@contextlib.contextmanager
def killing(fragment: str, every: bool = False) -> Iterator[list[int]]:
    """While inside, SIGKILL the first process (or, with `every`, each one) whose command line
    contains `fragment`, as the OOM killer or a lost node would; yields the PIDs killed."""
    killed: list[int] = []
    stop = threading.Event()

    def kill() -> None:
        while not stop.is_set() and (every or not killed):
            for pid in processes_running(fragment):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                if not every:
                    break
            time.sleep(0.01)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    try:
        yield killed
    finally:
        stop.set()
        killer.join(timeout=5)


@contextlib.contextmanager
def model_server(model_uri: str, tracking_uri: str, timeout: float = 240.0) -> Iterator[str]:
    """A live `mlflow models serve -m <model_uri>` on 127.0.0.1 (this venv, no new env), its
    registry at `tracking_uri`; yields its base URL once /ping answers."""
    import subprocess
    import sys
    import tempfile

    from tests.conftest import ServerExited, free_port, wait_for_http

    port = free_port()
    bin_dir = Path(sys.executable).parent  # the server runs `uvicorn` from PATH: this venv's
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    mlflow_bin = str(bin_dir / "mlflow")
    command = [mlflow_bin, "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_for_http(f"{url}/ping", timeout, server)
            except ServerExited as exited:
                log.seek(0)
                raise RuntimeError(f"{exited}:\n{log.read()[-4000:]!r}") from None
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def post_json(url: str, payload: dict) -> dict:
    """POST `payload` as JSON; the decoded JSON answer."""
    import json
    import urllib.request

    request = urllib.request.Request(
        url, json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())
