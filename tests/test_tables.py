"""The manifests are Delta Lake tables (issue 12 §3): any engine reads one current row per video,
old Parquet-log outputs migrate without losing a row, concurrent writers lose nothing, and a
failed local write leaves no temporary file behind."""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from tests.test_storage import root  # noqa: F401  (the local / S3 fixture)
from videobert import storage, tables


def manifest_rows(*rows: tuple[str, str]) -> list[dict[str, str]]:
    return [{"video_id": vid, "status": status, "source_uri": f"s3://b/{vid}.mp4"} for vid, status in rows]


def delta(directory: str) -> DeltaTable:
    uri, options = tables.delta_location(directory)
    return DeltaTable(uri, storage_options=options)


def test_standard_readers_see_one_current_row_per_video(root: str) -> None:  # noqa: F811
    tables.upsert_manifest(root, manifest_rows(("a", "error"), ("b", "ok")))
    tables.upsert_manifest(root, manifest_rows(("a", "ok"), ("c", "ok")))
    directory = tables.Layout(root).videos
    expected = {"a": "ok", "b": "ok", "c": "ok"}
    # deltalake itself, and the pyarrow dataset it hands to DuckDB / Polars / Spark-style engines
    for table in (delta(directory).to_pyarrow_table(), delta(directory).to_pyarrow_dataset().to_table()):
        rows = table.select(["video_id", "status"]).to_pylist()
        assert {r["video_id"]: r["status"] for r in rows} == expected and len(rows) == 3
    current = tables.read_manifest(root).select(["video_id", "status"]).to_pylist()
    assert {r["video_id"]: r["status"] for r in current} == expected


def test_ray_data_read_delta_sees_the_current_rows(ray_cluster, tmp_path: Path) -> None:
    import ray

    output = str(tmp_path)
    tables.upsert_manifest(output, manifest_rows(("a", "error"), ("b", "ok")))
    tables.upsert_manifest(output, manifest_rows(("a", "ok")))
    rows = ray.data.read_delta(tables.Layout(output).videos).select_columns(["video_id", "status"]).take_all()
    assert sorted((r["video_id"], r["status"]) for r in rows) == [("a", "ok"), ("b", "ok")]


def write_legacy_part(directory: str, name: str, rows: list[dict], schema: pa.Schema) -> str:
    """A part as the Parquet-log manifests (before Delta) wrote it."""
    uri = storage.join(directory, name)
    storage.write_parquet(tables.rows_table(rows, schema), uri)
    return uri


def test_parquet_log_outputs_migrate_without_losing_a_row(root: str) -> None:  # noqa: F811
    videos = tables.Layout(root).videos
    write_legacy_part(
        videos,
        "part-20260101T000000000000-1a2b3c4d.parquet",
        manifest_rows(("a", "error")),
        tables.MANIFEST_SCHEMA,
    )
    write_legacy_part(
        videos,
        "part-20260102T000000000000-compact.parquet",
        manifest_rows(("a", "ok"), ("b", "error")),
        tables.MANIFEST_SCHEMA,
    )
    tokens = tables.Layout(root).tokens_manifest("cb", "tx")
    write_legacy_part(
        tokens,
        "part-20260103T000000000000-00ff00ff.parquet",
        [{"video_id": "a", "etag": "e", "segments": 3}],
        tables.TOKENS_MANIFEST_SCHEMA,
    )

    manifest = tables.read_manifest(root).sort_by("video_id")
    assert manifest.select(["video_id", "status"]).to_pylist() == [
        {"video_id": "a", "status": "ok"},
        {"video_id": "b", "status": "error"},
    ]
    assert tables.read_tokens_manifest(root, "cb", "tx").select(["video_id", "segments"]).to_pylist() == [
        {"video_id": "a", "segments": 3}
    ]
    # Both are Delta tables now, and the old parts are gone.
    for directory in (videos, tokens):
        assert delta(directory).version() == 0
        assert tables.legacy_parts(directory) == []
    assert delta(videos).to_pyarrow_table().num_rows == 2
    # Later writes go on from the migrated rows.
    tables.upsert_manifest(root, manifest_rows(("b", "ok")))
    assert set(tables.read_manifest(root).column("status").to_pylist()) == {"ok"}


def upsert_many(output: str, writer: int, rounds: int) -> None:
    for i in range(rounds):
        # Each writer adds its own videos and rewrites a shared one every round.
        tables.upsert_manifest(output, manifest_rows((f"w{writer}-{i}", "ok"), ("shared", f"w{writer}")))
    tables.maintain(tables.Layout(output).videos)


def test_concurrent_writers_lose_and_duplicate_nothing(root: str) -> None:  # noqa: F811
    writers, rounds = 4, 6
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=upsert_many, args=(root, w, rounds)) for w in range(writers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [p.exitcode for p in processes] == [0] * writers
    ids = tables.read_manifest(root).column("video_id").to_pylist()
    assert len(ids) == len(set(ids)) == writers * rounds + 1
    assert set(ids) == {f"w{w}-{i}" for w in range(writers) for i in range(rounds)} | {"shared"}


def test_maintenance_with_nothing_to_do_writes_nothing(tmp_path: Path) -> None:
    output = str(tmp_path)
    tables.upsert_manifest(output, manifest_rows(("a", "ok")))
    before = sorted(p.name for p in Path(tables.Layout(output).videos).rglob("*"))
    version = delta(tables.Layout(output).videos).version()
    tables.maintain(tables.Layout(output).videos)
    tables.upsert_manifest(output, [])
    assert delta(tables.Layout(output).videos).version() == version
    assert sorted(p.name for p in Path(tables.Layout(output).videos).rglob("*")) == before


def write_over_the_file_size_limit(path: str) -> None:
    """The disk fills up midway: the kernel refuses bytes past RLIMIT_FSIZE (EFBIG)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        storage.write_bytes(path, b"x" * 100_000)
    except OSError:
        os._exit(7)
    os._exit(0)


def test_a_failed_local_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "part.parquet"
    process = multiprocessing.get_context("spawn").Process(
        target=write_over_the_file_size_limit, args=(str(target),)
    )
    process.start()
    process.join(timeout=60)
    assert process.exitcode == 7  # the write failed with an OSError ...
    assert list(tmp_path.iterdir()) == []  # ... and left neither the file nor a temporary one


def test_local_commits_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Power loss cannot be caused here, so this spies on fsync: the file's data and the
    directory entry of its rename both reach the disk before the write returns."""
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    target = tmp_path / "sub" / "t.parquet"
    storage.write_parquet(pa.table({"x": [1]}), str(target))
    assert pq.read_table(target).column("x").to_pylist() == [1]
    assert any(".tmp-" in path for path in synced), synced  # the data, before the rename
    assert str(target.parent) in synced  # the rename itself


def test_a_damaged_data_file_is_reported_skipped_and_repaired(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output = str(tmp_path)
    tables.upsert_manifest(output, manifest_rows(("a", "ok")))
    tables.upsert_manifest(output, manifest_rows(("b", "ok")))  # a second data file
    (damaged,) = [
        f
        for f in delta(tables.Layout(output).videos).file_uris()
        if "a" in pq.read_table(f)["video_id"].to_pylist()
    ]
    Path(damaged).write_bytes(b"PAR1 garbage")
    # Readers see the rest and name the damaged file.
    assert tables.read_manifest(output).column("video_id").to_pylist() == ["b"]
    assert damaged in caplog.text
    # The next commit rewrites the table without it; video a looks new, so its stage redoes it.
    tables.upsert_manifest(output, manifest_rows(("c", "ok")))
    assert sorted(tables.read_manifest(output).column("video_id").to_pylist()) == ["b", "c"]
    assert damaged not in delta(tables.Layout(output).videos).file_uris()
