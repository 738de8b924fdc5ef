"""`videobert embed`: videos under `source` -> one embedding per video, with a registered model.

Batch inference on Ray Data, in two passes (the model needs all of a video's clips at once,
while one video's clip rows are spread over the actors, so the driver regroups them between):

    embed.model_uri (e.g. @champion) resolved once to models:/<name>/<version>
    pass 1: ray_stages.decoded_videos with ClipWords actors     decode + S3D + the model's codebook:
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

import logging
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipelines.common import init_ray, stage_main
from pipelines.ray_stages import actor_pool, decoded_videos, map_stage
from videobert import storage, tables
from videobert.config import ExperimentConfig
from videobert.results import EmbedResult, stage_run_id
from videobert.videos import ClipWords

log = logging.getLogger("videobert.embed")


def words_of_decoded_videos(
    config: ExperimentConfig,
    videos: list[dict[str, Any]],
    codebook_uri: str,
    committer: Any,
    keep_features: bool = False,
) -> list[dict[str, Any]]:
    """Pass 1: decode + features + visual words; returns pass-2 items, commits decode errors.
    `keep_features`: the items carry the clip features too (a model with video_input features/both)."""
    items: list[dict[str, Any]] = []
    for video in decoded_videos(
        config, videos, ClipWords, codebook_uri=codebook_uri, keep_features=keep_features
    ):
        if video.error:
            committer.commit_video(video.video_id, video.error, error_kind=video.error_kind)
        else:
            words = video.visual_words().tolist()
            item = {"video_id": video.video_id, "visual_words": words, "features_uri": ""}
            if keep_features:
                item["features"] = video.clip_features().astype(np.float32).reshape(-1).tolist()
            items.append(item)
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
    from videobert.embedding import REUSED, EmbedCommitter, plan_embed
    from videobert.features import load_weights
    from videobert.tracking import tracking_uri, use_tracking_uri

    started = time.perf_counter()
    storage.check_reachable(config.source, config.s3)
    use_tracking_uri(tracking_uri(config))
    plan = plan_embed(config)
    model = plan.model
    takes_features = model.config.takes_features  # the model's video_input: features or both
    log.info("embedding with %s (resolved from %s)", model.uri, model.requested)
    result = EmbedResult(
        run_id=stage_run_id("embed"),
        listed=len(plan.videos),
        skipped=len(plan.videos) - len(plan.todo),
        model_uri=model.uri,
        requested_uri=model.requested,
        model_version=model.version,
        directory=plan.layout.directory,
    )
    committer = EmbedCommitter(config, plan.layout, plan.todo, plan.provenance, result, plan.manifest)
    if plan.todo:
        log.info("embedding %d videos (%d from extract's features)", len(plan.todo), len(plan.reuse))
        init_ray()
        items = []
        if plan.decode:
            load_weights(config.encoder, config.s3)  # fail fast (exit 2) when the S3D weights cannot be had
            items += words_of_decoded_videos(
                config, plan.decode, plan.codebook_uri, committer, keep_features=takes_features
            )
        features_file = tables.Layout(config.output).features_file
        items += [
            {"video_id": v["video_id"], "visual_words": [], "features_uri": features_file(v["video_id"])}
            | ({"features": []} if takes_features else {})
            for v in plan.reuse
        ]
        committer.features.update({v["video_id"]: REUSED for v in plan.reuse})
        for row in embedded(config, items, model.uri, plan.codebook_uri) if items else ():
            committer.commit_video(row["video_id"], row["error"], row)
    committer.flush()
    tables.maintain(plan.layout.manifest, config.s3)
    result.seconds = time.perf_counter() - started
    print(result.report(), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    return stage_main("embed", run, argv)


if __name__ == "__main__":
    sys.exit(main())
