"""The data contracts: where every table lives under `output`, and its Parquet schema.

Layout under the experiment's `output` root (local directory or s3://):

    videos/part-*.parquet        the manifest; append-only parts, the newest row per video wins
    features/<video_id>.parquet  one file per video, one row per clip (deterministic name)
    codebook/<version>/          centroids (safetensors) + codebook.json + gallery.png
    text/<version>/              the WordPiece tokenizer (tokenizer.json, vocab.txt)
    tokens/<codebook>-<text>/    token shards for that codebook and tokenizer version
    mlflow.db                    the default MLflow store when MLFLOW_TRACKING_URI is unset
    train/                       Ray Train storage (checkpoints)

Commit rule: a video's outputs are written first, its manifest row last. Readers go
through the manifest (`read_manifest`, `read_features`) so they see only committed work.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from videobert import storage
from videobert.config import S3Config

MANIFEST_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("source_uri", pa.string()),
        ("etag", pa.string()),
        ("size", pa.int64()),
        ("status", pa.string()),  # ok | error
        ("error", pa.string()),  # "<stage>: <reason>" when status is error
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

    @property
    def train(self) -> str:
        return storage.join(self.output, "train")

    @property
    def mlflow_db(self) -> str:
        return storage.join(self.output, "mlflow.db")


def manifest_rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Manifest rows (dicts; missing columns become null) as a table with MANIFEST_SCHEMA."""
    stamped = [{"updated_at": now_utc(), **row} for row in rows]
    columns = {name: [row.get(name) for row in stamped] for name in MANIFEST_SCHEMA.names}
    return pa.table(columns, schema=MANIFEST_SCHEMA)


def append_manifest(output: str, rows: list[dict[str, Any]], s3: S3Config | None = None) -> None:
    """Commit manifest rows as one new part file (atomic). The newest row per video wins."""
    if not rows:
        return
    name = f"part-{now_utc().strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:8]}.parquet"
    storage.write_parquet(manifest_rows_table(rows), storage.join(Layout(output).videos, name), s3)


def read_manifest(output: str, s3: S3Config | None = None) -> pa.Table:
    """The current manifest: the newest committed row of every video (empty table if none)."""
    table = storage.read_parquet_dir(Layout(output).videos, s3)
    if table is None or table.num_rows == 0:
        return MANIFEST_SCHEMA.empty_table()
    table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    order = pc.sort_indices(table, [("video_id", "ascending"), ("updated_at", "descending")])
    table = table.take(order)
    ids = table.column("video_id").to_pylist()
    keep = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    return table.take(pa.array(keep, pa.int64()))


def compact_manifest(output: str, s3: S3Config | None = None) -> None:
    """Rewrite the manifest as one part and drop the old parts.

    The new part is committed before old ones are deleted, so a kill in between leaves
    duplicates that `read_manifest` already resolves, never a loss.
    """
    layout = Layout(output)
    parts = storage.list_files(layout.videos, s3, suffix=".parquet")
    if len(parts) <= 1:
        return
    current = read_manifest(output, s3)
    name = f"part-{now_utc().strftime('%Y%m%dT%H%M%S%f')}-compact.parquet"
    storage.write_parquet(current, storage.join(layout.videos, name), s3)
    for part in parts:
        storage.delete(part, s3)


def read_features(output: str, s3: S3Config | None = None, video_ids: list[str] | None = None) -> pa.Table:
    """Committed clip features (videos whose manifest row is `ok`), ordered by video and clip."""
    manifest = read_manifest(output, s3)
    ok = manifest.filter(pc.equal(manifest.column("status"), "ok"))
    wanted = ok.column("video_id").to_pylist()
    if video_ids is not None:
        wanted = [v for v in wanted if v in set(video_ids)]
    layout = Layout(output)
    tables = [storage.read_parquet(layout.features_file(v), s3) for v in wanted]
    if not tables:
        return FEATURES_SCHEMA.empty_table()
    table = pa.concat_tables([t.cast(FEATURES_SCHEMA) for t in tables])
    return table.take(pc.sort_indices(table, [("video_id", "ascending"), ("clip_index", "ascending")]))
