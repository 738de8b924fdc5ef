"""One way to read and write objects whether they live on S3 or on a local disk.

A location is a URI: `s3://bucket/prefix` or a local path. S3 endpoint and region come
from `S3Config` or the standard AWS variables (`AWS_ENDPOINT_URL` included); credentials
only ever from the environment (the default AWS credential chain), never from config.
Requests are retried with exponential backoff; a permanent failure raises `StorageError`
naming the object.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from videobert.config import S3Config, redact

T = TypeVar("T")
log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A storage operation that failed for good; the message names the object.

    Redacted like ConfigError: botocore and pyarrow errors quote the endpoint URL.
    """

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


@dataclass(frozen=True)
class ObjectInfo:
    """A listed object: its URI, size in bytes and ETag (a content version)."""

    uri: str
    size: int
    etag: str


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URI or local path."""
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def stem(uri: str) -> str:
    """File name without its last extension."""
    return posixpath.splitext(posixpath.basename(uri))[0]


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def endpoint_url(s3: S3Config | None) -> str | None:
    return (s3.endpoint_url if s3 else None) or os.environ.get("AWS_ENDPOINT_URL") or None


def region(s3: S3Config | None) -> str:
    return (
        (s3.region if s3 else None)
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    )


def _s3_key(s3: S3Config | None) -> tuple[str | None, str, int]:
    return endpoint_url(s3), region(s3), (s3.max_attempts if s3 else 5)


@functools.lru_cache(maxsize=8)
def _arrow_s3(endpoint: str | None, region_name: str, attempts: int) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "region": region_name,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
        "connect_timeout": 10,
        "request_timeout": 60,
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host or endpoint
        kwargs["scheme"] = scheme if host else "https"
    return pafs.S3FileSystem(**kwargs)


@functools.lru_cache(maxsize=8)
def _boto_client(endpoint: str | None, region_name: str, attempts: int) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=10)
    return boto3.client("s3", endpoint_url=endpoint, region_name=region_name, config=config)


def boto_client(s3: S3Config | None = None) -> Any:
    """A boto3 S3 client with the configured endpoint and retries."""
    return _boto_client(*_s3_key(s3))


def filesystem(uri: str, s3: S3Config | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for the URI and the path inside it (what Ray Data's `filesystem=` takes)."""
    if is_s3(uri):
        return _arrow_s3(*_s3_key(s3)), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def arrow_location(uri: str, s3: S3Config | None = None) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) for libraries that take pyarrow's pair (Ray Train storage): an S3
    filesystem with this config's endpoint, or None and an absolute local path."""
    if is_s3(uri):
        return filesystem(uri, s3)
    return None, os.path.abspath(uri)


def with_retries(what: str, action: Callable[[], T], attempts: int = 5, base_delay: float = 0.2) -> T:
    """Run `action`, retrying transient errors with exponential backoff.

    Missing objects are not retried. After the last attempt the error names `what`.
    """
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as error:
            if attempt == attempts:
                raise StorageError(f"{what}: failed after {attempts} attempts: {error}") from error
            time.sleep(base_delay * 2 ** (attempt - 1))
        except Exception as error:  # botocore errors: retry only throttling/5xx-like ones
            code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NoSuchBucket", "AccessDenied", "403"):
                raise StorageError(f"{what}: {code}: {error}") from error
            if attempt == attempts:
                raise StorageError(f"{what}: failed after {attempts} attempts: {error}") from error
            time.sleep(base_delay * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def check_reachable(uri: str, s3: S3Config | None = None, create: bool = False) -> None:
    """Fail early with a clear message when a location cannot be used."""
    if is_s3(uri):
        bucket, _ = _split_s3(uri)
        client = boto_client(s3)
        try:
            client.head_bucket(Bucket=bucket)
        except Exception as error:
            code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
            if create and code in ("404", "NoSuchBucket"):
                client.create_bucket(Bucket=bucket)
                return
            raise StorageError(
                f"cannot reach {uri} (endpoint {endpoint_url(s3) or 'AWS default'}): {error}"
            ) from error
    elif create:
        Path(uri).mkdir(parents=True, exist_ok=True)
    elif not Path(uri).exists():
        raise StorageError(f"{uri}: no such directory")


def list_objects(
    uri: str, s3: S3Config | None = None, extensions: Iterable[str] | None = None
) -> list[ObjectInfo]:
    """Every object under `uri`, recursively, sorted by URI; optionally only these extensions."""
    wanted = {e.lower().lstrip(".") for e in extensions} if extensions else None

    def keep(name: str) -> bool:
        return wanted is None or posixpath.splitext(name)[1].lower().lstrip(".") in wanted

    found: list[ObjectInfo] = []
    if is_s3(uri):
        bucket, prefix = _split_s3(uri)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        paginator = boto_client(s3).get_paginator("list_objects_v2")

        def pages() -> list[dict[str, Any]]:
            return list(paginator.paginate(Bucket=bucket, Prefix=prefix))

        for page in with_retries(f"list {uri}", pages):
            for item in page.get("Contents", []):
                if keep(item["Key"]) and not item["Key"].endswith("/"):
                    found.append(
                        ObjectInfo(f"s3://{bucket}/{item['Key']}", item["Size"], item["ETag"].strip('"'))
                    )
    else:
        root = Path(uri)
        if not root.exists():
            raise StorageError(f"{uri}: no such directory")
        for path in root.rglob("*"):
            if path.is_file() and keep(path.name):
                stat = path.stat()
                found.append(ObjectInfo(str(path.resolve()), stat.st_size, _local_etag(stat)))
    return sorted(found, key=lambda o: o.uri)


def _local_etag(stat: os.stat_result) -> str:
    # Local files have no ETag; size + mtime changes whenever the content is rewritten.
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def object_info(uri: str, s3: S3Config | None = None) -> ObjectInfo | None:
    """One object's size and ETag, as `list_objects` reports them; None when it does not exist."""
    if not is_s3(uri):
        path = Path(uri)
        if not path.is_file():
            return None
        stat = path.stat()
        return ObjectInfo(str(path.resolve()), stat.st_size, _local_etag(stat))
    bucket, key = _split_s3(uri)
    client = boto_client(s3)

    def head() -> ObjectInfo | None:
        try:
            item = client.head_object(Bucket=bucket, Key=key)
        except Exception as error:  # botocore ClientError: a missing key is an answer, not a failure
            code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return ObjectInfo(uri, int(item["ContentLength"]), item["ETag"].strip('"'))

    return with_retries(f"stat {uri}", head)


def open_input(uri: str, s3: S3Config | None = None) -> Any:
    """A seekable binary file for reading (streams from S3; nothing is read up front)."""
    fs, path = filesystem(uri, s3)
    return with_retries(f"open {uri}", lambda: fs.open_input_file(path))


def read_bytes(uri: str, s3: S3Config | None = None) -> bytes:
    def read() -> bytes:
        fs, path = filesystem(uri, s3)
        with fs.open_input_stream(path) as stream:
            return stream.read()

    return with_retries(f"read {uri}", read)


def write_bytes(uri: str, data: bytes, s3: S3Config | None = None) -> None:
    """Write atomically: readers see the old object or the whole new one, never a part."""
    fs, path = filesystem(uri, s3)
    if is_s3(uri):

        def put() -> None:
            with fs.open_output_stream(path) as stream:  # one PUT: atomic on S3
                stream.write(data)

        with_retries(f"write {uri}", put)
        return
    parent = Path(path).parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:  # a full disk or a kill: no temporary file is left behind
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # and the rename itself survives a crash
    finally:
        os.close(directory)


def exists(uri: str, s3: S3Config | None = None) -> bool:
    fs, path = filesystem(uri, s3)
    info = with_retries(f"stat {uri}", lambda: fs.get_file_info(path))
    return info.type != pafs.FileType.NotFound


def delete(uri: str, s3: S3Config | None = None) -> None:
    fs, path = filesystem(uri, s3)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        with_retries(f"delete {uri}", lambda: fs.delete_dir(path))
    elif info.type == pafs.FileType.File:
        with_retries(f"delete {uri}", lambda: fs.delete_file(path))


def list_files(uri: str, s3: S3Config | None = None, suffix: str = "") -> list[str]:
    """URIs of files under `uri` (recursive) ending in `suffix`; empty if `uri` does not exist."""
    fs, path = filesystem(uri, s3)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    infos = with_retries(f"list {uri}", lambda: fs.get_file_info(selector))
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(
        prefix + info.path
        for info in infos
        if info.type == pafs.FileType.File and info.path.endswith(suffix) and ".tmp-" not in info.path
    )


def write_parquet(table: pa.Table, uri: str, s3: S3Config | None = None) -> None:
    """Write one Parquet file atomically (temp file + rename locally; a single PUT on S3)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    write_bytes(uri, buffer.getvalue(), s3)


def read_parquet(uri: str, s3: S3Config | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file."""
    return pq.read_table(io.BytesIO(read_bytes(uri, s3)), columns=columns)


def read_parquet_if_readable(
    uri: str, s3: S3Config | None = None, columns: list[str] | None = None
) -> pa.Table | None:
    """One Parquet file, or None (with a warning naming it) when it cannot be read: one
    damaged file is reported and skipped, never fatal to every later stage."""
    try:
        return read_parquet(uri, s3, columns=columns)
    except (OSError, pa.ArrowException, StorageError) as error:
        log.warning("skipping unreadable %s: %s", uri, error)
        return None


def read_parquet_dir(
    uri: str, s3: S3Config | None = None, schema: pa.Schema | None = None, columns: list[str] | None = None
) -> pa.Table | None:
    """Every readable Parquet file under `uri` as one table; None when there is none."""
    files = list_files(uri, s3, suffix=".parquet")
    tables = [t for t in (read_parquet_if_readable(f, s3, columns=columns) for f in files) if t is not None]
    if not tables:
        return None
    if schema is not None:
        tables = [t.cast(schema) if columns is None else t for t in tables]
    return pa.concat_tables(tables, promote_options="default")
