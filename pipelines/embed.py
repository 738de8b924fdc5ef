"""`videobert embed`: videos under `source` -> one embedding per video, with a registered model.

Batch inference on Ray Data, in two passes (the model needs all of a video's clips at once,
while one video's clip rows are spread over the actors, so the driver regroups them between):

    embed.model_uri (e.g. @champion) resolved once to models:/<name>/<version>
    pass 1: ray_stages.decoded_clips with ClipWords actors     decode + S3D + the model's codebook:
                                                               a visual word per clip (4 bytes, not 4 KiB)
    pass 2: from_items(videos: words, or extract's features)
              .map_batches(VideoEmbedder)                      the model, loaded once per actor
              .iter_batches() -> the driver                    EmbedCommitter commits each video

Outputs, under `<embed.output or output/embeddings>/<name>-v<version>/`: data/<video_id>.parquet
first, the video's manifest/ row after it. A rerun skips videos whose row is up to date (the
skip rule of `videobert.videos.is_up_to_date`, errors retried with `embed.retry_errors`); a new
model version gets a folder of its own. A video that extract already turned into features
(`ok`, same ETag, same encoder) is not decoded again (`embed.reuse_features`).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

from pipelines.common import init_ray, stage_main
from pipelines.ray_stages import actor_pool, decoded_clips, map_stage
from videobert import storage, tables
from videobert.config import ConfigError, ExperimentConfig
from videobert.results import EmbedResult, stage_run_id
from videobert.videos import ClipWords, gather_videos, list_videos, rows_by_video, videos_to_do

log = logging.getLogger("videobert.embed")


def words_of_decoded_videos(
    config: ExperimentConfig, videos: list[dict[str, Any]], codebook_uri: str, committer: Any
) -> list[dict[str, Any]]:
    """Pass 1: decode + features + visual words; returns pass-2 items, commits decode errors."""
    dataset = decoded_clips(config, videos, ClipWords, codebook_uri=codebook_uri)
    items: list[dict[str, Any]] = []
    for video in gather_videos(dataset.iter_batches(batch_size=None, batch_format="numpy"), "embed"):
        if video.error:
            committer.commit_video(video.video_id, video.error)
        else:
            words = [int(clip["visual_word"]) for clip in video.ordered_clips()]
            items.append({"video_id": video.video_id, "visual_words": words, "features_uri": ""})
    return items


def embedded(
    config: ExperimentConfig, items: list[dict[str, Any]], model_uri: str, codebook_uri: str
) -> Iterator[dict[str, Any]]:
    """Pass 2: the model over the videos' words; yields result rows (EMBED_RESULT_SCHEMA)."""
    import ray

    from videobert.embedding import VideoEmbedder
    from videobert.tracking import tracking_uri

    num_batches = math.ceil(len(items) / config.embed.videos_per_batch)
    dataset = map_stage(
        ray.data.from_items(items, override_num_blocks=num_batches),
        VideoEmbedder,
        actor_pool(num_batches, actors=config.embed.actors),
        config.embed.videos_per_batch,
        model_uri=model_uri,
        tracking_uri=tracking_uri(config),
        codebook_uri=codebook_uri,
        s3=config.s3,
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()


def run(config: ExperimentConfig) -> EmbedResult:
    """Embed every new or changed video under `source` with `embed.model_uri` (see module doc)."""
    # Modules that pull in mlflow and torch are imported here, so `--help` answers at once.
    from videobert.codebook import METADATA_FILE
    from videobert.embedding import REUSED, EmbedCommitter, check_compatible, reusable_features
    from videobert.features import encoder_id, load_weights
    from videobert.registry import resolve_model_version
    from videobert.tracking import tracking_uri, use_tracking_uri

    started = time.perf_counter()
    s3 = config.s3
    storage.check_reachable(config.source, s3)
    use_tracking_uri(tracking_uri(config))
    model = resolve_model_version(config.embed.model_uri)
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
    videos = list_videos(config)
    manifest = rows_by_video(tables.read_newest(layout.manifest, tables.EMBED_MANIFEST_SCHEMA, s3))
    todo = videos_to_do(videos, manifest, config.embed.retry_errors)
    result = EmbedResult(
        run_id=stage_run_id("embed"),
        listed=len(videos),
        skipped=len(videos) - len(todo),
        model_uri=model.uri,
        requested_uri=model.requested,
        model_version=model.version,
        directory=layout.directory,
    )
    provenance = {"model_uri": model.uri, "codebook_version": codebook_meta["version"], "encoder": encoder}
    committer = EmbedCommitter(config, layout, todo, provenance, result)
    if todo:
        reusable = reusable_features(config, encoder) if config.embed.reuse_features else {}
        reuse = [v for v in todo if reusable.get(v["video_id"]) == v["etag"]]
        decode = [v for v in todo if reusable.get(v["video_id"]) != v["etag"]]
        log.info(
            "embedding %d videos (%d from extract's features, %d to decode; %d up to date)",
            len(todo),
            len(reuse),
            len(decode),
            result.skipped,
        )
        init_ray()
        items = []
        if decode:
            load_weights(config.encoder, s3)  # fail fast (exit 2) when the S3D weights cannot be had
            items += words_of_decoded_videos(config, decode, codebook_uri, committer)
        features_of = tables.Layout(config.output).features_file
        items += [
            {"video_id": v["video_id"], "visual_words": [], "features_uri": features_of(v["video_id"])}
            for v in reuse
        ]
        committer.features.update({v["video_id"]: REUSED for v in reuse})
        if items:
            for row in embedded(config, items, model.uri, codebook_uri):
                committer.commit_video(row["video_id"], row["error"], row)
    committer.flush()
    tables.compact_parts(layout.manifest, tables.EMBED_MANIFEST_SCHEMA, s3)
    result.seconds = time.perf_counter() - started
    print(result.report(), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    return stage_main("embed", run, argv)


if __name__ == "__main__":
    sys.exit(main())
