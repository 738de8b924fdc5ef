"""One writer at a time under an `output` (issue 12 §3): a second stage started on the same
output refuses with exit code 5 while the first one lives, a lease is renewed while its holder
works, and the lease of a holder that died expires. Locally and on S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.common import EXIT_BUSY
from tests.test_extract import make_corpus, write_config
from tests.test_storage import root  # noqa: F401  (the local / S3 fixture)
from videobert import storage
from videobert.config import LeaseConfig, load_config
from videobert.lease import LeaseHeldError, hold_lease, lease_uri

REPO = Path(__file__).resolve().parent.parent
SHORT = LeaseConfig(ttl_s=3, wait_s=0, poll_s=0.2)

HOLD_FOREVER = """
import sys, time
from videobert.config import LeaseConfig, load_config
from videobert.lease import hold_lease
with hold_lease(sys.argv[1], "holder", LeaseConfig(ttl_s=float(sys.argv[2]))):
    print("held", flush=True)
    time.sleep(600)
"""


def start_holder(output: str, ttl_s: float) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_FOREVER, output, str(ttl_s)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_live_holder_keeps_others_out_and_a_dead_one_lets_them_in(root: str) -> None:  # noqa: F811
    holder = start_holder(root, ttl_s=3)
    try:
        time.sleep(4)  # past one ttl: only renewal keeps it held
        with pytest.raises(LeaseHeldError, match="another run is writing to"):
            with hold_lease(root, "second", SHORT):
                pass
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # it dies holding the lease
        holder.wait(timeout=30)
    # On the same host a dead holder's lease is taken over at once.
    with hold_lease(root, "second", SHORT):
        assert storage.exists(lease_uri(root))
        with hold_lease(root, "nested", SHORT):  # re-entrant within one process (`videobert run`)
            pass
    assert not storage.exists(lease_uri(root))  # released on the way out


def test_a_holder_on_another_host_is_waited_for_until_its_lease_expires(root: str) -> None:  # noqa: F811
    """Another node's holder cannot be checked for life: its lease counts until it expires."""
    record = {"holder": "x", "stage": "run", "host": "another-node", "pid": 1, "expires_at": time.time() + 3}
    storage.write_bytes(lease_uri(root), json.dumps(record).encode())
    with pytest.raises(LeaseHeldError, match=r"run \(pid 1 on another-node\)"):
        with hold_lease(root, "second", SHORT):
            pass
    started = time.monotonic()
    with hold_lease(root, "second", LeaseConfig(ttl_s=3, wait_s=30, poll_s=0.2)):
        assert json.loads(storage.read_bytes(lease_uri(root)))["host"] != "another-node"
    assert 1 < time.monotonic() - started < 20


def test_a_second_stage_on_the_same_output_exits_busy(ray_cluster, tmp_path: Path) -> None:
    """A real extract holds the output; `videobert run` started meanwhile refuses at once with
    exit code 5 and writes nothing; once the first is done, the next run may go."""
    source = make_corpus(tmp_path / "src", good=4, bad=False)
    config_file = write_config(tmp_path, str(source), str(tmp_path / "out"))
    config = load_config(config_file)
    settings = ["--config", str(config_file)]
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.address}
    first = subprocess.Popen(
        [sys.executable, "-m", "pipelines.extract", *settings],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not storage.exists(lease_uri(config.output)):
            assert first.poll() is None and time.monotonic() < deadline, "extract never took the lease"
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "pipelines.run", *settings],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert first.poll() is None, "the first extract should still be running"
        assert second.returncode == EXIT_BUSY, second.stderr
        assert "busy: another run is writing to" in second.stderr and "extract (pid" in second.stderr
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
    assert not storage.exists(lease_uri(config.output))
