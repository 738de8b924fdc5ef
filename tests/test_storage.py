"""Storage over local paths and S3 over real HTTP (moto's server): round trips, listing, atomicity, errors."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from videobert import storage, tables
from videobert.config import S3Config


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_bytes_round_trip_and_listing(root: str) -> None:
    storage.check_reachable(root, create=True)
    storage.write_bytes(storage.join(root, "a/one.mp4"), b"1" * 10)
    storage.write_bytes(storage.join(root, "a/b/two.MKV"), b"2" * 20)
    storage.write_bytes(storage.join(root, "a/notes.txt"), b"text")
    assert storage.read_bytes(storage.join(root, "a/b/two.MKV")) == b"2" * 20
    assert storage.exists(storage.join(root, "a/one.mp4"))
    assert not storage.exists(storage.join(root, "a/none.mp4"))

    listed = storage.list_objects(root, extensions=["mp4", ".mkv"])
    assert [(Path(o.uri).name, o.size) for o in listed] == [("two.MKV", 20), ("one.mp4", 10)]
    assert all(o.etag for o in listed)
    everything = storage.list_objects(root)
    assert len(everything) == 3 and everything == sorted(everything, key=lambda o: o.uri)

    # Rewriting an object changes its ETag (what incremental extraction keys on).
    before = {o.uri: o.etag for o in listed}
    storage.write_bytes(storage.join(root, "a/one.mp4"), b"3" * 11)
    after = {o.uri: o.etag for o in storage.list_objects(root, extensions=["mp4"])}
    uri = next(u for u in after if u.endswith("one.mp4"))
    assert after[uri] != before[uri]

    with storage.open_input(storage.join(root, "a/b/two.MKV")) as handle:
        handle.seek(15)
        assert handle.read() == b"22222"
    storage.delete(storage.join(root, "a/notes.txt"))
    assert not storage.exists(storage.join(root, "a/notes.txt"))


def test_parquet_round_trip(root: str) -> None:
    table = pa.table({"x": [1, 2, 3], "y": ["a", "b", "c"]})
    storage.write_parquet(table, storage.join(root, "t/part-1.parquet"))
    storage.write_parquet(pa.table({"x": [4], "y": ["d"]}), storage.join(root, "t/part-2.parquet"))
    assert storage.read_parquet(storage.join(root, "t/part-1.parquet")).equals(table)
    both = storage.read_parquet_dir(storage.join(root, "t"))
    assert sorted(both.column("x").to_pylist()) == [1, 2, 3, 4]
    assert storage.read_parquet_dir(storage.join(root, "missing")) is None


def test_manifest_upsert_keeps_one_current_row_per_video(root: str) -> None:
    tables.upsert_manifest(root, [{"video_id": "v1", "status": "error", "error": "decode: x"}])
    tables.upsert_manifest(root, [{"video_id": "v1", "status": "ok", "num_clips": 3}, {"video_id": "v2"}])
    manifest = tables.read_manifest(root).sort_by("video_id")
    assert manifest.column("video_id").to_pylist() == ["v1", "v2"]
    assert manifest.column("status").to_pylist()[0] == "ok"


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that dies midway leaves the old file whole (temp file + rename)."""
    target = tmp_path / "f.parquet"
    storage.write_bytes(str(target), b"old")

    def crash(src: str, dst: str) -> None:  # the process dies between writing and renaming
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes(str(target), b"new contents")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    # The stray temp file is invisible to readers of the directory.
    assert storage.list_files(str(tmp_path), suffix=".parquet") == [str(target)]


def test_missing_objects_and_unreachable_storage_name_the_object(s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises((FileNotFoundError, storage.StorageError)) as caught:
        storage.read_bytes(f"{s3_bucket}/nope/missing.mp4")
    assert "missing.mp4" in str(caught.value)
    with pytest.raises(storage.StorageError, match="no such directory"):
        storage.list_objects(str(tmp_path / "absent"))
    with pytest.raises(storage.StorageError, match="cannot reach s3://no-such-bucket-here"):
        storage.check_reachable("s3://no-such-bucket-here/x")
    # An endpoint where nothing listens: retried, then a permanent error that names the object.
    dead = S3Config(endpoint_url="http://127.0.0.1:9", max_attempts=2)
    with pytest.raises(storage.StorageError, match="list s3://bucket/videos: "):
        storage.list_objects("s3://bucket/videos", dead)


def test_with_retries_recovers_from_transient_errors() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("connection reset")
        return "done"

    assert storage.with_retries("get thing", flaky, attempts=5, base_delay=0.001) == "done"
    assert len(calls) == 3

    def always_down() -> None:
        raise OSError("connection refused")

    with pytest.raises(
        storage.StorageError, match="get s3://b/k: failed after 2 attempts: connection refused"
    ):
        storage.with_retries("get s3://b/k", always_down, attempts=2, base_delay=0.001)


def test_filesystem_for_ray_data(s3_bucket: str) -> None:
    fs, path = storage.filesystem(f"{s3_bucket}/data/")
    assert path == s3_bucket[len("s3://") :] + "/data"
    storage.write_bytes(f"{s3_bucket}/data/x.bin", b"abc")
    with fs.open_input_stream(path + "/x.bin") as stream:
        assert stream.read() == b"abc"
