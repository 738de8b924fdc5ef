"""The data contracts: where every table lives under `output`, and its Parquet schema.

Layout under the experiment's `output` root (local directory or s3://):

    videos/part-*.parquet        the manifest; append-only parts, the newest row per video wins
    features/<video_id>.parquet  one file per video, one row per clip (deterministic name)
    codebook/<version>/          centroids (safetensors) + codebook.json + gallery.png
    text/<version>/              the WordPiece tokenizer (tokenizer.json, vocab.txt)
    tokens/<codebook>-<text>/    token shards for that codebook and tokenizer version
    tokens_manifest/<codebook>-<text>/part-*.parquet
                                 what each video's token file was made from (its inputs'
                                 ETags); append-only parts, the newest row per video wins
    mlflow.db                    the default MLflow store when MLFLOW_TRACKING_URI is unset
    train/                       Ray Train storage (checkpoints)
    embeddings/<model>-v<version>/
      data/<video_id>.parquet    `videobert embed`: one row per video (deterministic name)
      manifest/part-*.parquet    one status row per listed video; the newest row per video wins

Commit rule: a video's outputs are written first, its manifest row last. Readers go
through the manifest (`read_manifest`, `read_features`) so they see only committed work.
The tokens manifest lives outside `tokens/<codebook>-<text>/` on purpose: everything under
that directory is read as token shards (pretrain lists it recursively).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
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


def append_parts(directory: str, table: pa.Table, s3: S3Config | None = None) -> None:
    """Commit rows as one new part file (atomic, unique name) in an append-only directory."""
    name = f"part-{now_utc().strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:8]}.parquet"
    storage.write_parquet(table, storage.join(directory, name), s3)


def read_newest(directory: str, schema: pa.Schema, s3: S3Config | None = None) -> pa.Table:
    """The newest row of every video across a directory's parts (empty table if none)."""
    table = storage.read_parquet_dir(directory, s3)
    if table is None or table.num_rows == 0:
        return schema.empty_table()
    table = table.select(schema.names).cast(schema)
    order = pc.sort_indices(table, [("video_id", "ascending"), ("updated_at", "descending")])
    table = table.take(order)
    ids = table.column("video_id").to_pylist()
    keep = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    return table.take(pa.array(keep, pa.int64()))


def compact_parts(directory: str, schema: pa.Schema, s3: S3Config | None = None) -> None:
    """Rewrite a directory of parts as one part and drop the old parts.

    The new part is committed before old ones are deleted, so a kill in between leaves
    duplicates that `read_newest` already resolves, never a loss.
    """
    parts = storage.list_files(directory, s3, suffix=".parquet")
    if len(parts) <= 1:
        return
    name = f"part-{now_utc().strftime('%Y%m%dT%H%M%S%f')}-compact.parquet"
    storage.write_parquet(read_newest(directory, schema, s3), storage.join(directory, name), s3)
    for part in parts:
        storage.delete(part, s3)


def manifest_rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Manifest rows (dicts; missing columns become null) as a table with MANIFEST_SCHEMA."""
    return rows_table(rows, MANIFEST_SCHEMA)


def append_manifest(output: str, rows: list[dict[str, Any]], s3: S3Config | None = None) -> None:
    """Commit manifest rows as one new part file (atomic). The newest row per video wins."""
    if rows:
        append_parts(Layout(output).videos, manifest_rows_table(rows), s3)


def read_manifest(output: str, s3: S3Config | None = None) -> pa.Table:
    """The current manifest: the newest committed row of every video (empty table if none)."""
    return read_newest(Layout(output).videos, MANIFEST_SCHEMA, s3)


def compact_manifest(output: str, s3: S3Config | None = None) -> None:
    """Rewrite the manifest as one part and drop the old parts (see `compact_parts`)."""
    compact_parts(Layout(output).videos, MANIFEST_SCHEMA, s3)


def append_tokens_manifest(
    output: str,
    codebook_version: str,
    tokenizer_version: str,
    rows: list[dict[str, Any]],
    s3: S3Config | None = None,
) -> None:
    """Record what these videos' token files were made from (after the files are written)."""
    if rows:
        directory = Layout(output).tokens_manifest(codebook_version, tokenizer_version)
        append_parts(directory, rows_table(rows, TOKENS_MANIFEST_SCHEMA), s3)


def read_tokens_manifest(
    output: str, codebook_version: str, tokenizer_version: str, s3: S3Config | None = None
) -> pa.Table:
    """The newest tokens-manifest row of every video for one token version (empty if none)."""
    directory = Layout(output).tokens_manifest(codebook_version, tokenizer_version)
    return read_newest(directory, TOKENS_MANIFEST_SCHEMA, s3)


def compact_tokens_manifest(
    output: str, codebook_version: str, tokenizer_version: str, s3: S3Config | None = None
) -> None:
    """Rewrite one token version's manifest as one part (see `compact_parts`)."""
    directory = Layout(output).tokens_manifest(codebook_version, tokenizer_version)
    compact_parts(directory, TOKENS_MANIFEST_SCHEMA, s3)


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


def read_embeddings(directory: str, s3: S3Config | None = None) -> pa.Table:
    """Committed embeddings of one model version (videos whose embed manifest row is `ok`)."""
    layout = EmbeddingLayout(directory)
    manifest = read_newest(layout.manifest, EMBED_MANIFEST_SCHEMA, s3)
    ok = manifest.filter(pc.equal(manifest.column("status"), "ok")).column("video_id").to_pylist()
    parts = [storage.read_parquet(layout.data_file(v), s3).cast(EMBEDDINGS_SCHEMA) for v in ok]
    if not parts:
        return EMBEDDINGS_SCHEMA.empty_table()
    return pa.concat_tables(parts).sort_by("video_id")
