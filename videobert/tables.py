"""The data contracts: where every table lives under `output`, and its schema.

Layout under the experiment's `output` root (local directory or s3://):

    videos/                      the manifest: a Delta Lake table, one current row per video
    features/<video_id>.parquet  one file per video, one row per clip (deterministic name)
    codebook/<version>/          centroids (safetensors) + codebook.json + gallery.png
    text/<version>/              the WordPiece tokenizer (tokenizer.json, vocab.txt)
    tokens/<codebook>-<text>/    token shards for that codebook and tokenizer version
    tokens_manifest/<codebook>-<text>/
                                 Delta table: what each video's token file was made from
                                 (its inputs' ETags), one row per video
    mlflow.db                    the default MLflow store when MLFLOW_TRACKING_URI is unset
    train/                       Ray Train storage (checkpoints)
    embeddings/<model>-v<version>/
      data/<video_id>.parquet    `videobert embed`: one row per video (deterministic name)
      manifest/                  Delta table: one status row per listed video
    _lease.json                  who is writing under `output` now (videobert/lease.py)

Commit rule: a video's outputs are written first, its manifest row last. Readers go
through the manifest (`read_manifest`, `read_features`) so they see only committed work.
Any Delta reader (Ray Data's `read_delta`, DuckDB, Spark, Polars) sees the same current rows.
The tokens manifest lives outside `tokens/<codebook>-<text>/` on purpose: everything under
that directory is read as token shards (pretrain lists it recursively).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from videobert import storage
from videobert.config import S3Config

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("source_uri", pa.string()),
        ("etag", pa.string()),
        ("size", pa.int64()),
        ("status", pa.string()),  # ok | error
        ("error", pa.string()),  # "<stage>: <reason>" when status is error
        ("error_kind", pa.string()),  # permanent | transient (see ERROR_KINDS) when status is error
        ("num_clips", pa.int64()),
        ("duration_s", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("fps", pa.float64()),
        ("transcript_uri", pa.string()),
        ("transcript_error", pa.string()),  # set by tokenize when the sidecar cannot be used
        ("encoder", pa.string()),
        ("run_id", pa.string()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)

PERMANENT, TRANSIENT = "permanent", "transient"
ERROR_KINDS = (PERMANENT, TRANSIENT)
"""permanent: this very object (ETag) fails this way every time (not a video, over a bound);
skipped until it changes or `retry_errors` is set. transient: storage time-outs, a killed
worker; retried on the next run."""

FEATURE_DIM = 1024

FEATURES_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("clip_index", pa.int64()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("feature", pa.list_(pa.float16(), FEATURE_DIM)),
    ]
)

TOKENS_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("segment_index", pa.int64()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("text", pa.string()),
        ("text_ids", pa.list_(pa.int32())),
        ("video_tokens", pa.list_(pa.int32())),
        ("codebook_version", pa.string()),
        ("tokenizer_version", pa.string()),
    ]
)


EMBEDDINGS_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("source_uri", pa.string()),
        ("etag", pa.string()),
        ("model_uri", pa.string()),  # the resolved version: models:/<name>/<version>
        ("codebook_version", pa.string()),
        ("encoder", pa.string()),
        ("num_clips", pa.int64()),
        ("num_chunks", pa.int64()),  # model passes of at most max_seq_len tokens
        ("embedding", pa.list_(pa.float32())),  # mean last hidden state over the video tokens
        ("cls_embedding", pa.list_(pa.float32())),  # last hidden state at [CLS], mean over chunks
        ("visual_words", pa.list_(pa.int32())),  # codebook ids, one per clip in clip order
        ("run_id", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)

EMBED_MANIFEST_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("source_uri", pa.string()),
        ("etag", pa.string()),
        ("size", pa.int64()),
        ("status", pa.string()),  # ok | error
        ("error", pa.string()),  # "<stage>: <reason>" when status is error
        ("error_kind", pa.string()),  # permanent | transient when status is error
        ("num_clips", pa.int64()),
        ("features", pa.string()),  # decoded | reused (extract's committed features)
        ("model_uri", pa.string()),
        ("encoder", pa.string()),
        ("run_id", pa.string()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)


TOKENS_MANIFEST_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        # The inputs the video's token file was made from; any change means "tokenize again".
        ("etag", pa.string()),  # the source video's ETag in videos/ when it was tokenized
        ("encoder", pa.string()),
        ("extract_run_id", pa.string()),  # the extract run that wrote the features used
        ("transcript_uri", pa.string()),
        ("transcript_etag", pa.string()),  # null: no transcript, or it could not be found
        ("segments", pa.int64()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)


def video_id(source_uri: str) -> str:
    """Stable id of a video, derived from where it lives."""
    return hashlib.sha1(source_uri.encode()).hexdigest()[:16]


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Layout:
    """Paths of every table under one experiment's `output` root."""

    output: str

    @property
    def videos(self) -> str:
        return storage.join(self.output, "videos")

    @property
    def features(self) -> str:
        return storage.join(self.output, "features")

    def features_file(self, vid: str) -> str:
        return storage.join(self.features, f"{vid}.parquet")

    @property
    def codebooks(self) -> str:
        return storage.join(self.output, "codebook")

    def codebook(self, version: str) -> str:
        return storage.join(self.codebooks, version)

    @property
    def text(self) -> str:
        return storage.join(self.output, "text")

    def tokenizer(self, version: str) -> str:
        return storage.join(self.text, version)

    @property
    def tokens_root(self) -> str:
        return storage.join(self.output, "tokens")

    def tokens(self, codebook_version: str, tokenizer_version: str) -> str:
        return storage.join(self.tokens_root, f"{codebook_version}-{tokenizer_version}")

    def tokens_manifest(self, codebook_version: str, tokenizer_version: str) -> str:
        return storage.join(self.output, "tokens_manifest", f"{codebook_version}-{tokenizer_version}")

    @property
    def train(self) -> str:
        return storage.join(self.output, "train")

    @property
    def mlflow_db(self) -> str:
        return storage.join(self.output, "mlflow.db")

    @property
    def embeddings(self) -> str:
        """Default root of `videobert embed` outputs (`embed.output` moves it)."""
        return storage.join(self.output, "embeddings")


@dataclass(frozen=True)
class EmbeddingLayout:
    """One model version's embeddings: `<root>/<model name>-v<version>/`."""

    directory: str

    @classmethod
    def for_model(cls, root: str, model_name: str, version: str) -> EmbeddingLayout:
        # Registry names may hold characters a path should not (e.g. catalog.schema.model).
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)
        return cls(storage.join(root, f"{safe}-v{version}"))

    @property
    def data(self) -> str:
        return storage.join(self.directory, "data")

    def data_file(self, vid: str) -> str:
        return storage.join(self.data, f"{vid}.parquet")

    @property
    def manifest(self) -> str:
        return storage.join(self.directory, "manifest")


def rows_table(rows: list[dict[str, Any]], schema: pa.Schema = MANIFEST_SCHEMA) -> pa.Table:
    """Status rows (dicts; missing columns become null) as a table with `schema`, stamped now."""
    stamped = [{"updated_at": now_utc(), **row} for row in rows]
    columns = {name: [row.get(name) for row in stamped] for name in schema.names}
    return pa.table(columns, schema=schema)


# ---- manifests are Delta Lake tables ---------------------------------------------------------
#
# Why Delta Lake (delta-rs): a manifest is "one current row per video", upserted by runs that
# may overlap. Delta gives exactly that to every engine (Ray Data's read_delta, DuckDB, Spark,
# Polars, deltalake itself): a MERGE on video_id commits atomically, and concurrent commits are
# detected and retried, locally and on S3 (conditional PUTs, no lock service). A plain Parquet
# log could not: standard readers saw every old row, and two compactions raced.

KEY = "video_id"
UPSERT_TRIES = 30  # optimistic commits: retried with jittered backoff when a writer races us
MAX_FILES = 32  # compact a table once a stage leaves more data files than this
# Old Parquet-log parts (before Delta): part-<UTC time>-<8 hex | compact>.parquet
LEGACY_PART = re.compile(r"part-\d{8}T\d{6,}-(?:[0-9a-f]{8}|compact)\.parquet$")


def delta_location(directory: str, s3: S3Config | None = None) -> tuple[str, dict[str, str] | None]:
    """(table URI, storage options) for delta-rs. Credentials are not passed: delta-rs reads
    them from the environment (AWS_*), like boto3 does."""
    if not storage.is_s3(directory):
        return os.path.abspath(directory), None
    options = {"AWS_REGION": storage.region(s3)}
    endpoint = storage.endpoint_url(s3)
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    return directory.rstrip("/"), options


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns and types (columns it lacks become null)."""
    columns = [
        table.column(field.name).cast(field.type)
        if field.name in table.column_names
        else pa.nulls(table.num_rows, field.type)
        for field in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def legacy_parts(directory: str, s3: S3Config | None = None) -> list[str]:
    """The old Parquet-log parts in a directory (before manifests were Delta tables)."""
    return [f for f in storage.list_files(directory, s3, suffix=".parquet") if LEGACY_PART.search(f)]


def newest_rows(table: pa.Table) -> pa.Table:
    """The newest row (by updated_at) of every video."""
    order = pc.sort_indices(table, [(KEY, "ascending"), ("updated_at", "descending")])
    table = table.take(order)
    ids = table.column(KEY).to_pylist()
    keep = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    return table.take(pa.array(keep, pa.int64()))


def _read_legacy(parts: list[str], schema: pa.Schema, s3: S3Config | None) -> pa.Table:
    tables = [conform(storage.read_parquet(part, s3), schema) for part in parts]
    return newest_rows(pa.concat_tables(tables)) if tables else schema.empty_table()


def _existing_table(uri: str, options: dict[str, str] | None) -> Any:
    """The Delta table at `uri`, or None. (Not `DeltaTable.is_deltatable`: it holds the GIL
    through its S3 requests, which stalls an S3 endpoint served from this same process.)"""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(uri, storage_options=options)
    except TableNotFoundError:
        return None


def _open_table(directory: str, schema: pa.Schema, s3: S3Config | None) -> Any:
    """The directory's Delta table, created on first use. An old Parquet log found there is
    converted (its newest row per video becomes the table's first version) and then removed:
    existing outputs migrate automatically, and nothing is lost."""
    from deltalake import write_deltalake
    from deltalake.exceptions import DeltaError

    uri, options = delta_location(directory, s3)
    table = _existing_table(uri, options)
    if table is None:
        parts = legacy_parts(directory, s3)
        try:
            write_deltalake(uri, _read_legacy(parts, schema, s3), mode="error", storage_options=options)
        except DeltaError:
            if _existing_table(uri, options) is None:  # not a lost race: a real failure
                raise
        for part in parts:  # only now that the table holds their rows
            storage.delete(part, s3)
        if parts:
            log.info("converted %d Parquet-log parts of %s into a Delta table", len(parts), directory)
        table = _existing_table(uri, options)
    return table


def _readable_rows(table: Any, schema: pa.Schema, s3: S3Config | None) -> tuple[pa.Table, list[str]]:
    """The rows of every data file of the table that can be read, and the files that cannot."""
    readable, unreadable = [], []
    for uri in table.file_uris():
        part = storage.read_parquet_if_readable(uri, s3)
        if part is None:
            unreadable.append(uri)
        else:
            readable.append(conform(part, schema))
    rows = pa.concat_tables(readable) if readable else schema.empty_table()
    return rows, unreadable


def _is_table_error(error: Exception) -> bool:
    from deltalake.exceptions import DeltaError

    return isinstance(error, OSError | pa.ArrowException | DeltaError)


def read_table(directory: str, schema: pa.Schema, s3: S3Config | None = None) -> pa.Table:
    """A manifest's current rows, one per video (empty table if there is none yet).

    A damaged data file is reported and skipped: its videos look new, so their stage redoes
    them (and the next upsert repairs the table), rather than every later stage failing on it.
    """
    uri, options = delta_location(directory, s3)
    try:
        table = _existing_table(uri, options)
        if table is None:
            if not legacy_parts(directory, s3):
                return schema.empty_table()
            table = _open_table(directory, schema, s3)
        try:
            return conform(table.to_pyarrow_table(), schema)
        except Exception as error:
            if not _is_table_error(error):
                raise
            rows, unreadable = _readable_rows(table, schema, s3)
            if not unreadable:
                raise
            log.warning("%s: skipped %d unreadable data files: %s", directory, len(unreadable), unreadable)
            return rows
    except Exception as error:  # a table that cannot be read at all is a storage error (exit 3)
        if not _is_table_error(error) or isinstance(error, storage.StorageError):
            raise
        raise storage.StorageError(f"read table {directory}: {error}") from error


def _repair(directory: str, schema: pa.Schema, s3: S3Config | None) -> bool:
    """Rewrite a table without its unreadable data files (their rows are lost, and their
    videos redone by their stage); False when every file reads fine."""
    from deltalake import write_deltalake

    uri, options = delta_location(directory, s3)
    rows, unreadable = _readable_rows(_open_table(directory, schema, s3), schema, s3)
    if not unreadable:
        return False
    log.warning(
        "%s: rewriting the table without %d unreadable data files: %s", directory, len(unreadable), unreadable
    )
    write_deltalake(uri, rows, mode="overwrite", storage_options=options)
    return True


def upsert(directory: str, rows: pa.Table, s3: S3Config | None = None) -> None:
    """Insert or replace these videos' rows in one atomic commit (a MERGE on video_id).

    Concurrent writers are safe: a commit that loses a race is retried on the new version.
    """
    from deltalake.exceptions import CommitFailedError

    if rows.num_rows == 0:
        return
    rows = newest_rows(rows)  # a MERGE source holds each key once
    for attempt in range(1, UPSERT_TRIES + 1):
        try:
            table = _open_table(directory, rows.schema, s3)
            (
                table.merge(rows, f"t.{KEY} = s.{KEY}", source_alias="s", target_alias="t", merge_schema=True)
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute()
            )
            return
        except CommitFailedError as error:
            if attempt == UPSERT_TRIES:
                raise storage.StorageError(f"commit to {directory}: {error}") from error
            time.sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))
        except Exception as error:
            if not _is_table_error(error) or isinstance(error, storage.StorageError):
                raise
            if not _repair(directory, rows.schema, s3):  # not a damaged file: nothing to repair
                raise storage.StorageError(f"commit to {directory}: {error}") from error


def maintain(directory: str, s3: S3Config | None = None) -> None:
    """After a stage's commits: compact a table that has many small files, and delete files
    the table stopped using more than a week ago (Delta's default retention, which keeps
    slower readers and time travel safe). Nothing is written when there is nothing to do."""
    table = _existing_table(*delta_location(directory, s3))
    if table is None:
        return
    # Parts left by a conversion that died before removing them (the table holds their rows):
    # looked for here, once a stage, not on every commit, since it lists the whole directory.
    for part in legacy_parts(directory, s3):
        storage.delete(part, s3)
    if len(table.file_uris()) > MAX_FILES:
        table.optimize.compact()
    table.vacuum(dry_run=False)


def upsert_manifest(output: str, rows: list[dict[str, Any]], s3: S3Config | None = None) -> None:
    """Commit these videos' current `videos/` rows (dicts; missing columns become null)."""
    if rows:
        upsert(Layout(output).videos, rows_table(rows, MANIFEST_SCHEMA), s3)


def read_manifest(output: str, s3: S3Config | None = None) -> pa.Table:
    """The current manifest: one row per video (empty table if none)."""
    return read_table(Layout(output).videos, MANIFEST_SCHEMA, s3)


def upsert_tokens_manifest(
    output: str,
    codebook_version: str,
    tokenizer_version: str,
    rows: list[dict[str, Any]],
    s3: S3Config | None = None,
) -> None:
    """Record what these videos' token files were made from (after the files are written)."""
    if rows:
        directory = Layout(output).tokens_manifest(codebook_version, tokenizer_version)
        upsert(directory, rows_table(rows, TOKENS_MANIFEST_SCHEMA), s3)


def read_tokens_manifest(
    output: str, codebook_version: str, tokenizer_version: str, s3: S3Config | None = None
) -> pa.Table:
    """The tokens-manifest row of every video for one token version (empty if none)."""
    directory = Layout(output).tokens_manifest(codebook_version, tokenizer_version)
    return read_table(directory, TOKENS_MANIFEST_SCHEMA, s3)


def read_features(output: str, s3: S3Config | None = None, video_ids: list[str] | None = None) -> pa.Table:
    """Committed clip features (videos whose manifest row is `ok`), ordered by video and clip."""
    manifest = read_manifest(output, s3)
    ok = manifest.filter(pc.equal(manifest.column("status"), "ok"))
    wanted = ok.column("video_id").to_pylist()
    if video_ids is not None:
        wanted = [v for v in wanted if v in set(video_ids)]
    layout = Layout(output)
    tables = [
        t
        for t in (storage.read_parquet_if_readable(layout.features_file(v), s3) for v in wanted)
        if t is not None
    ]
    if not tables:
        return FEATURES_SCHEMA.empty_table()
    table = pa.concat_tables([t.cast(FEATURES_SCHEMA) for t in tables])
    return table.take(pc.sort_indices(table, [("video_id", "ascending"), ("clip_index", "ascending")]))


def read_embeddings(directory: str, s3: S3Config | None = None) -> pa.Table:
    """Committed embeddings of one model version (videos whose embed manifest row is `ok`)."""
    layout = EmbeddingLayout(directory)
    manifest = read_table(layout.manifest, EMBED_MANIFEST_SCHEMA, s3)
    ok = manifest.filter(pc.equal(manifest.column("status"), "ok")).column("video_id").to_pylist()
    parts = [
        t.cast(EMBEDDINGS_SCHEMA)
        for t in (storage.read_parquet_if_readable(layout.data_file(v), s3) for v in ok)
        if t is not None
    ]
    if not parts:
        return EMBEDDINGS_SCHEMA.empty_table()
    return pa.concat_tables(parts).sort_by("video_id")
