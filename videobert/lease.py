"""One writer at a time under an `output`: a lease file that works locally and on S3.

Two runs on the same `output` (a nightly run still going when the next one starts, or a stage
launched by hand meanwhile) would share checkpoints, MLflow runs and aliases. So every stage
holds `<output>/_lease.json` while it runs; a second one finds it and stops with
`LeaseHeldError` (exit code 5), or waits up to `lease.wait_s` for it.

- Taking it is an atomic create: `O_CREAT | O_EXCL` locally, a conditional PUT
  (`If-None-Match: *`) on S3. Exactly one of two racing writers wins.
- The holder renews it every `ttl_s / 3` seconds from a background thread. A holder that dies
  stops renewing, and once `expires_at` passes anyone may take it over (at once, on the same
  host, when its process is gone): locally by renaming the stale file away (only one rename
  can succeed), on S3 by a PUT conditional on the stale ETag.
- Within one process the lease is re-entrant: `videobert run` holds it once for all its stages.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from videobert import storage
from videobert.config import LeaseConfig, S3Config

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"


class LeaseHeldError(RuntimeError):
    """Another live run holds the lease on this output; the message names it."""


@dataclass
class _Held:
    uri: str
    holder: str
    depth: int
    stop: threading.Event
    thread: threading.Thread


_held: dict[str, _Held] = {}  # output URI -> this process's lease on it
_lock = threading.Lock()


def lease_uri(output: str) -> str:
    return storage.join(output, LEASE_FILE)


def _record(holder: str, stage: str, ttl_s: float) -> bytes:
    now = time.time()
    return json.dumps(
        {
            "holder": holder,
            "stage": stage,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquired_at": now,
            "expires_at": now + ttl_s,
        }
    ).encode()


class _Store:
    """Create-if-absent, read, replace-if-unchanged and delete of one small object."""

    def __init__(self, uri: str, s3: S3Config | None) -> None:
        self.uri, self.s3 = uri, s3

    def create(self, body: bytes) -> bool:
        """Write `body` only if nothing is there; False when something is."""
        if storage.is_s3(self.uri):
            return self._put(body, IfNoneMatch="*")
        path = Path(self.uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def read(self) -> tuple[dict[str, Any], str] | None:
        """(the record, a version token to replace it with), or None when there is none."""
        if storage.is_s3(self.uri):
            bucket, key = self.uri[len("s3://") :].split("/", 1)
            try:
                item = storage.boto_client(self.s3).get_object(Bucket=bucket, Key=key)
            except Exception as error:
                if _code(error) in ("NoSuchKey", "404"):
                    return None
                raise storage.StorageError(f"read lease {self.uri}: {error}") from error
            return _parse(item["Body"].read()), item["ETag"]
        try:
            data = Path(self.uri).read_bytes()
        except FileNotFoundError:
            return None
        return _parse(data), ""

    def replace(self, version: str, body: bytes) -> bool:
        """Overwrite only if it is still the version read; False when it changed."""
        if storage.is_s3(self.uri):
            return self._put(body, IfMatch=version)
        # Local: move the stale file aside; of two writers only one rename succeeds.
        aside = f"{self.uri}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(self.uri, aside)
        except FileNotFoundError:
            return False
        os.unlink(aside)
        return self.create(body)

    def renew(self, holder: str, body: bytes, version: str) -> str | None:
        """Rewrite our own record; the new version token, or None when it is no longer ours."""
        current = self.read()
        if current is None or current[0].get("holder") != holder:
            return None
        if storage.is_s3(self.uri):
            if not self._put(body, IfMatch=version):
                return None
            current = self.read()
            return current[1] if current else None
        storage.write_bytes(self.uri, body)
        return ""

    def delete(self) -> None:
        storage.delete(self.uri, self.s3)

    def _put(self, body: bytes, **condition: str) -> bool:
        bucket, key = self.uri[len("s3://") :].split("/", 1)
        try:
            storage.boto_client(self.s3).put_object(Bucket=bucket, Key=key, Body=body, **condition)
        except Exception as error:
            # 412: the condition failed; 409: a racing conditional write won.
            if _code(error) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise storage.StorageError(f"write lease {self.uri}: {error}") from error
        return True


def _code(error: Exception) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


def _parse(data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(data)
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}  # a torn or foreign file: it has no valid expiry, so it counts as expired


def _describe(record: dict[str, Any]) -> str:
    left = float(record.get("expires_at", 0)) - time.time()
    return (
        f"{record.get('stage', '?')} (pid {record.get('pid', '?')} on {record.get('host', '?')}), "
        f"lease expires in {max(left, 0):.0f} s unless renewed"
    )


def _died_on_this_host(record: dict[str, Any]) -> bool:
    """A holder on this very host whose process is gone: no need to wait for its lease to expire."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


def _try_take(store: _Store, holder: str, stage: str, ttl_s: float) -> dict[str, Any] | None:
    """Take the lease if it is free or expired; None on success, else the live holder's record."""
    if store.create(_record(holder, stage, ttl_s)):
        return None
    current = store.read()
    if current is None:  # released meanwhile
        return None if store.create(_record(holder, stage, ttl_s)) else {}
    record, version = current
    if float(record.get("expires_at", 0)) > time.time() and not _died_on_this_host(record):
        return record
    log.warning("taking over the lease on %s from %s", store.uri, _describe(record))
    return None if store.replace(version, _record(holder, stage, ttl_s)) else {}


def _renew_until(store: _Store, holder: str, stage: str, config: LeaseConfig, stop: threading.Event) -> None:
    version = store.read()
    token = version[1] if version else ""
    while not stop.wait(config.ttl_s / 3):
        try:
            token = store.renew(holder, _record(holder, stage, config.ttl_s), token)
        except Exception as error:  # keep trying: the lease only lapses after ttl_s
            log.warning("could not renew the lease on %s: %s", store.uri, error)
            continue
        if token is None:
            log.error("lost the lease on %s: another run took it over", store.uri)
            return


@contextmanager
def hold_lease(output: str, stage: str, config: LeaseConfig, s3: S3Config | None = None) -> Iterator[None]:
    """Hold the lease on `output` for the block (re-entrant within this process)."""
    key = output.rstrip("/")
    with _lock:
        held = _held.get(key)
        if held is not None:
            held.depth += 1
    if held is not None:
        try:
            yield
        finally:
            with _lock:
                held.depth -= 1
        return

    store = _Store(lease_uri(output), s3)
    holder = uuid.uuid4().hex
    deadline = time.monotonic() + config.wait_s
    while (record := _try_take(store, holder, stage, config.ttl_s)) is not None:
        if time.monotonic() >= deadline:
            who = _describe(record) if record else "a run that was taking it at the same moment"
            raise LeaseHeldError(
                f"another run is writing to {output}: {who}. Wait for it to finish, or set "
                f"lease.wait_s to wait for it; a lease whose holder died expires after lease.ttl_s."
            )
        time.sleep(min(config.poll_s, max(deadline - time.monotonic(), 0.01)))
    stop = threading.Event()
    thread = threading.Thread(
        target=_renew_until, args=(store, holder, stage, config, stop), name="videobert-lease", daemon=True
    )
    thread.start()
    with _lock:
        _held[key] = _Held(store.uri, holder, 1, stop, thread)
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
        with _lock:
            del _held[key]
        current = store.read()
        if current is not None and current[0].get("holder") == holder:
            store.delete()
