"""`videobert embed`: videos under `source` -> one embedding per video, with a registered model.

Batch inference on Ray Data, reusing extract's listing, decode tasks and feature actors:

    embed.model_uri (e.g. @champion) resolved once to models:/<name>/<version>
    from_items(videos to decode)                 one block per video
      .flat_map(extract.decode_video)            decode tasks (CPU): clip rows + one END row per video
      .map_batches(VisualWordActor)              extract's FeatureActor (S3D, a GPU each when the
                                                 cluster has GPUs) + the model's codebook: a
                                                 visual word per clip
      .iter_batches()  -> the driver             regroups each video's words (ints, so it stays small)
    from_items(videos: words, or extract's features to reuse)
      .map_batches(EmbedActor)                   the model, loaded once per actor (GPU when present):
                                                 video-only chunks -> pooled hidden states
      .iter_batches()  -> the driver             commits each video

Two passes because the model needs all of a video's clips at once while one video's clip rows
are spread over the feature actors; the driver regroups them in between, as extract does.

Outputs, under `<embed.output or output/embeddings>/<name>-v<version>/`: data/<video_id>.parquet
(EMBEDDINGS_SCHEMA, deterministic name, atomic) first, the video's manifest/ row after it
(EMBED_MANIFEST_SCHEMA, buffered). A rerun skips videos whose row is `ok` with the same ETag,
and those that failed with the same ETag unless `embed.retry_errors`: only new or changed
videos are embedded, and a new model version gets a folder of its own. A video that extract
already turned into features (`ok`, same ETag, same encoder) is not decoded again
(`embed.reuse_features`). A bad video ends as an `error` row; the run goes on.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipelines.common import init_ray, stage_main
from pipelines.extract import CLIP, ClipGatherer, FeatureActor, decode_video, feature_pool, list_videos
from videobert import storage, tables
from videobert.config import ConfigError, DecodeConfig, EncoderConfig, ExperimentConfig, S3Config

if TYPE_CHECKING:  # mlflow and torch load only when the stage runs
    from videobert.registry import ModelVersionInfo

log = logging.getLogger("videobert.embed")

DECODED, REUSED = "decoded", "reused"
RESULT_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("error", pa.string()),
        ("num_clips", pa.int64()),
        ("num_chunks", pa.int64()),
        ("embedding", pa.list_(pa.float32())),
        ("cls_embedding", pa.list_(pa.float32())),
        ("visual_words", pa.list_(pa.int32())),
    ]
)


@dataclass
class EmbedSummary:
    """What one embed run did."""

    listed: int = 0
    ok: int = 0
    error: int = 0
    skipped: int = 0
    reused: int = 0
    """Videos embedded from extract's committed features instead of being decoded again."""
    clips: int = 0
    seconds: float = 0.0
    model_uri: str = ""
    """The resolved version, models:/<name>/<version>."""
    requested_uri: str = ""
    model_version: str = ""
    directory: str = ""
    run_id: str = ""
    errors: dict[str, str] = field(default_factory=dict)
    """source_uri -> "<stage>: <reason>" for every video that ended in error."""

    def report(self) -> str:
        layout = tables.EmbeddingLayout(self.directory)
        lines = [
            f"embed {self.run_id}: {self.model_uri} (from {self.requested_uri}): {self.listed} videos listed: "
            f"{self.ok} ok, {self.error} error, {self.skipped} skipped (unchanged since their last embed)",
            f"  {self.clips} clips in {self.seconds:.1f} s; extract's features reused for {self.reused} videos",
            f"  embeddings: {layout.data}",
            f"  manifest: {layout.manifest}",
        ]
        lines += [f"  error: {uri}: {reason}" for uri, reason in sorted(self.errors.items())]
        return "\n".join(lines)


# ---- Ray Data stages ---------------------------------------------------------------------


class VisualWordActor(FeatureActor):
    """extract's FeatureActor plus the model's codebook: clip rows leave with a visual word."""

    def __init__(self, encoder: EncoderConfig, decode: DecodeConfig, s3: S3Config, codebook_uri: str) -> None:
        from videobert.codebook import HierarchicalCodebook, default_device

        super().__init__(encoder, decode, s3)
        self.codebook = HierarchicalCodebook.load(codebook_uri, s3).to(default_device())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = super().__call__(batch)
        features = out.pop("feature")  # only the words travel on: 4 bytes a clip instead of 4 KiB
        words = np.full(len(features), -1, np.int32)
        good = [i for i in range(len(words)) if out["kind"][i] == CLIP and not out["error"][i]]
        if good:
            try:
                # Through float16 as extract stores them, so a video gets the words tokenize gave it.
                words[good] = self.codebook.assign(features[good].astype(np.float16))
            except Exception as error:  # its clips' videos become error rows
                out["error"][good] = f"words: {type(error).__name__}: {error}"
        out["visual_word"] = words
        return out


class EmbedActor:
    """One registered model version (loaded once) turning batches of videos into embeddings.

    A video comes with its visual words, or with extract's features file, whose words are
    assigned here with the model's codebook.
    """

    def __init__(self, model_uri: str, tracking_uri: str, codebook_uri: str, s3: S3Config) -> None:
        import torch

        from videobert.registry import load_registered_model
        from videobert.tracking import use_tracking_uri

        use_tracking_uri(tracking_uri)  # a fresh worker process: point it at the registry
        model, self.vocab, meta = load_registered_model(model_uri)
        self.model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.max_len = min(
            int(meta.get("max_seq_len", model.config.max_positions)), model.config.max_positions
        )
        self.codebook_uri, self.s3 = codebook_uri, s3
        self.codebook = None  # loaded on first use: only reused features need it here

    def words_from_features(self, features_uri: str) -> np.ndarray:
        from videobert.codebook import HierarchicalCodebook, default_device
        from videobert.token_shards import features_array

        if self.codebook is None:
            self.codebook = HierarchicalCodebook.load(self.codebook_uri, self.s3).to(default_device())
        table = storage.read_parquet(features_uri, self.s3).sort_by("clip_index")
        if table.num_rows == 0:
            raise ValueError("features file has no clips")
        return self.codebook.assign(features_array(table))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from videobert.embedding import embed_videos

        ids = [str(v) for v in batch["video_id"]]
        words: dict[str, np.ndarray] = {}
        errors: dict[str, str] = {}
        for vid, video_words, features_uri in zip(
            ids, batch["visual_words"], batch["features_uri"], strict=True
        ):
            try:
                if features_uri:
                    words[vid] = self.words_from_features(str(features_uri))
                else:
                    words[vid] = np.asarray(video_words, np.int64)
            except Exception as error:  # recorded as the video's error row, never raised
                errors[vid] = (
                    f"features: cannot reuse {features_uri}: {type(error).__name__}: {error} "
                    "(rerun with embed.reuse_features=false to decode the video instead)"
                )
        good = [vid for vid in ids if vid in words]
        embedded: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
        try:
            if good:
                result = embed_videos(self.model, self.vocab, [words[v] for v in good], self.max_len)
                for i, vid in enumerate(good):
                    embedded[vid] = (result.embedding[i], result.cls_embedding[i], int(result.num_chunks[i]))
        except Exception as error:  # a failed forward (e.g. out of memory) marks the batch's videos
            errors.update({vid: f"embed: {type(error).__name__}: {error}" for vid in good})
        rows = []
        for vid in ids:
            embedding, cls_embedding, chunks = embedded.get(vid, (None, None, 0))
            video_words = words.get(vid)
            rows.append(
                {
                    "video_id": vid,
                    "error": errors.get(vid),
                    "num_clips": 0 if video_words is None else len(video_words),
                    "num_chunks": chunks,
                    "embedding": None if embedding is None else embedding.tolist(),
                    "cls_embedding": None if cls_embedding is None else cls_embedding.tolist(),
                    "visual_words": None if video_words is None else video_words.astype(np.int32).tolist(),
                }
            )
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def embed_pool(config: ExperimentConfig, num_batches: int) -> tuple[int, float]:
    """(actors, GPUs per actor): one per GPU, else one CPU actor (the model is the big part)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = config.embed.actors or max(1, gpus)
    return max(1, min(actors, num_batches)), (1.0 if gpus else 0.0)


# ---- committing --------------------------------------------------------------------------


class EmbedCommitter:
    """Writes a video's embedding file, then (buffered) its manifest row; counts the summary."""

    def __init__(
        self,
        config: ExperimentConfig,
        layout: tables.EmbeddingLayout,
        videos: list[dict[str, Any]],
        provenance: dict[str, str],
        summary: EmbedSummary,
    ) -> None:
        self.config = config
        self.layout = layout
        self.videos = {v["video_id"]: v for v in videos}
        self.provenance = provenance  # model_uri, codebook_version, encoder
        self.summary = summary
        self.features: dict[str, str] = {}  # video_id -> DECODED | REUSED
        self.pending_rows: list[dict[str, Any]] = []

    def commit(self, vid: str, error: str | None, result: dict[str, Any] | None = None) -> None:
        video = self.videos[vid]
        num_clips = int(result["num_clips"]) if result and not error else 0
        if error is None:
            row = {
                **{k: video[k] for k in ("video_id", "source_uri", "etag")},
                **self.provenance,
                "num_clips": num_clips,
                "num_chunks": int(result["num_chunks"]),
                "embedding": result["embedding"],
                "cls_embedding": result["cls_embedding"],
                "visual_words": result["visual_words"],
                "run_id": self.summary.run_id,
                "created_at": tables.now_utc(),
            }
            table = pa.Table.from_pylist([row], schema=tables.EMBEDDINGS_SCHEMA)
            storage.write_parquet(table, self.layout.data_file(vid), self.config.s3)
            self.summary.ok += 1
            self.summary.clips += num_clips
            self.summary.reused += self.features.get(vid) == REUSED
        else:
            # A video that was ok before and is bad now must not keep a stale embedding around.
            storage.delete(self.layout.data_file(vid), self.config.s3)
            self.summary.error += 1
            self.summary.errors[video["source_uri"]] = error
            log.warning("%s: %s", video["source_uri"], error)
        self.pending_rows.append(
            {
                **{k: video[k] for k in ("video_id", "source_uri", "etag", "size")},
                "status": "ok" if error is None else "error",
                "error": error,
                "num_clips": num_clips,
                "features": self.features.get(vid, DECODED),
                "model_uri": self.provenance["model_uri"],
                "encoder": self.provenance["encoder"],
                "run_id": self.summary.run_id,
            }
        )
        if len(self.pending_rows) >= self.config.extract.manifest_flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.pending_rows:
            return
        table = tables.rows_table(self.pending_rows, tables.EMBED_MANIFEST_SCHEMA)
        tables.append_parts(self.layout.manifest, table, self.config.s3)
        self.pending_rows = []


# ---- planning ----------------------------------------------------------------------------


def check_compatible(model: ModelVersionInfo, codebook_meta: dict[str, Any], encoder: str) -> None:
    """The model's codebook must match its vocabulary and the encoder this config builds."""
    if int(codebook_meta["vocab_size"]) != model.num_visual:
        raise ConfigError(
            f"{model.uri}: its codebook has {codebook_meta['vocab_size']} visual words but the model "
            f"knows {model.num_visual}"
        )
    fitted_on = [e for e in (codebook_meta.get("encoder") or "").split(",") if e]
    if fitted_on and encoder not in fitted_on:
        raise ConfigError(
            f"{model.uri}: its codebook was fit on {', '.join(fitted_on)} features, but the encoder "
            f"section gives {encoder}; set encoder.weights / encoder.seed to the model's encoder"
        )


def to_do(
    videos: list[dict[str, Any]], manifest: pa.Table, retry_errors: bool
) -> tuple[list[dict[str, Any]], int]:
    """Videos that need embedding (new, changed, or failed with retry) and the count skipped."""
    done = {
        row["video_id"]: (row["status"], row["etag"])
        for row in manifest.select(["video_id", "status", "etag"]).to_pylist()
    }
    todo = []
    for video in videos:
        status, etag = done.get(video["video_id"], (None, None))
        if etag != video["etag"] or (status == "error" and retry_errors):
            todo.append(video)
    return todo, len(videos) - len(todo)


def reusable_features(config: ExperimentConfig, encoder: str) -> dict[str, str]:
    """video_id -> ETag of every video with extract's committed features from this encoder."""
    manifest = tables.read_manifest(config.output, config.s3)
    return {
        row["video_id"]: row["etag"]
        for row in manifest.select(["video_id", "status", "etag", "encoder"]).to_pylist()
        if row["status"] == "ok" and row["encoder"] == encoder
    }


# ---- the stage ---------------------------------------------------------------------------


def decode_words(
    config: ExperimentConfig, videos: list[dict[str, Any]], codebook_uri: str, committer: EmbedCommitter
) -> list[dict[str, Any]]:
    """Pass 1: decode + features + visual words; returns phase-2 items, commits decode errors."""
    import ray

    actors, gpus, cpus = feature_pool(config)
    dataset = (
        ray.data.from_items(videos, override_num_blocks=len(videos))
        .flat_map(
            decode_video,
            fn_kwargs={"decode": config.decode, "s3": config.s3},
            num_cpus=1,
            concurrency=config.extract.decode_concurrency,
        )
        .map_batches(
            VisualWordActor,
            fn_constructor_kwargs={
                "encoder": config.encoder,
                "decode": config.decode,
                "s3": config.s3,
                "codebook_uri": codebook_uri,
            },
            batch_size=config.encoder.clips_per_batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus,
            num_cpus=cpus,
        )
    )
    gatherer = ClipGatherer()
    items: list[dict[str, Any]] = []

    def finished(vid: str, end: dict[str, Any], clips: dict[int, dict[str, Any]]) -> None:
        clip_errors = sorted({str(c["error"]) for c in clips.values() if c["error"]})
        error = end["error"] if end["status"] != "ok" else (clip_errors[0] if clip_errors else None)
        if error:
            committer.commit(vid, error)
        else:
            words = [int(clips[i]["visual_word"]) for i in sorted(clips)]
            items.append({"video_id": vid, "visual_words": words, "features_uri": ""})

    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["video_id"])):
            complete = gatherer.add({name: column[i] for name, column in batch.items()})
            if complete is not None:
                finished(*complete)
    for vid, end in gatherer.leftovers("embed"):
        finished(vid, end, {})
    return items


def embed_items(
    config: ExperimentConfig, items: list[dict[str, Any]], model_uri: str, codebook_uri: str
) -> Iterator[dict[str, Any]]:
    """Pass 2: the model over the videos' words; yields result rows (RESULT_SCHEMA) as they come."""
    import ray

    from videobert.tracking import tracking_uri

    num_batches = math.ceil(len(items) / config.embed.videos_per_batch)
    actors, gpus = embed_pool(config, num_batches)
    dataset = ray.data.from_items(items, override_num_blocks=num_batches).map_batches(
        EmbedActor,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "tracking_uri": tracking_uri(config),
            "codebook_uri": codebook_uri,
            "s3": config.s3,
        },
        batch_size=config.embed.videos_per_batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus,
        num_cpus=1,
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()


def run(config: ExperimentConfig) -> EmbedSummary:
    """Embed every new or changed video under `source` with `embed.model_uri` (see module doc)."""
    # Modules that pull in mlflow and torch are imported here, so `--help` answers at once.
    from videobert.codebook import METADATA_FILE
    from videobert.features import encoder_id, load_weights
    from videobert.registry import resolve_model_version
    from videobert.tracking import tracking_uri, use_tracking_uri

    started = time.perf_counter()
    s3 = config.s3
    summary = EmbedSummary(
        run_id=f"embed-{tables.now_utc().strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    storage.check_reachable(config.source, s3)
    use_tracking_uri(tracking_uri(config))
    model = resolve_model_version(config.embed.model_uri)
    summary.model_uri, summary.requested_uri, summary.model_version = (
        model.uri,
        model.requested,
        model.version,
    )
    log.info("embedding with %s (resolved from %s)", model.uri, model.requested)
    codebook_uri = model.metadata.get("codebook_uri")
    if not codebook_uri:
        raise ConfigError(f"{model.uri}: its metadata.json names no codebook_uri")
    try:
        codebook_meta = json.loads(storage.read_bytes(storage.join(codebook_uri, METADATA_FILE), s3))
    except FileNotFoundError as error:
        raise ConfigError(f"{model.uri}: its codebook {codebook_uri} is gone ({error})") from error
    encoder = encoder_id(config.encoder)
    check_compatible(model, codebook_meta, encoder)

    root = config.embed.output or tables.Layout(config.output).embeddings
    storage.check_reachable(root, s3, create=True)
    layout = tables.EmbeddingLayout.for_model(root, model.name, model.version)
    summary.directory = layout.directory
    videos = list_videos(config)
    manifest = tables.read_newest(layout.manifest, tables.EMBED_MANIFEST_SCHEMA, s3)
    todo, summary.skipped = to_do(videos, manifest, config.embed.retry_errors)
    summary.listed = len(videos)
    provenance = {"model_uri": model.uri, "codebook_version": codebook_meta["version"], "encoder": encoder}
    committer = EmbedCommitter(config, layout, todo, provenance, summary)

    if todo:
        reusable = reusable_features(config, encoder) if config.embed.reuse_features else {}
        reuse = [v for v in todo if reusable.get(v["video_id"]) == v["etag"]]
        decode = [v for v in todo if reusable.get(v["video_id"]) != v["etag"]]
        log.info(
            "embedding %d videos (%d from extract's features, %d to decode; %d up to date)",
            len(todo),
            len(reuse),
            len(decode),
            summary.skipped,
        )
        init_ray()
        items = []
        if decode:
            load_weights(config.encoder, s3)  # fail fast (exit 2) when the S3D weights cannot be had
            items += decode_words(config, decode, codebook_uri, committer)
        features_of = tables.Layout(config.output).features_file
        items += [
            {"video_id": v["video_id"], "visual_words": [], "features_uri": features_of(v["video_id"])}
            for v in reuse
        ]
        committer.features.update({v["video_id"]: REUSED for v in reuse})
        if items:
            for result in embed_items(config, items, model.uri, codebook_uri):
                committer.commit(result["video_id"], result["error"], result)
    committer.flush()
    tables.compact_parts(layout.manifest, tables.EMBED_MANIFEST_SCHEMA, s3)
    summary.seconds = time.perf_counter() - started
    print(summary.report(), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("embed", run, argv)


if __name__ == "__main__":
    sys.exit(main())
