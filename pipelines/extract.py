"""`videobert extract`: videos under `source` -> clip features (features/) + the manifest (videos/).

The Ray plan is `ray_stages.decoded_videos` with `videobert.videos.ClipFeatures` actors; the
driver regroups each video's rows and commits it: features/<video_id>.parquet first (atomic,
deterministic name), its manifest row after it (upserted into the Delta table every
`extract.manifest_flush_every` videos). A kill at any point leaves only committed work visible, and a rerun redoes exactly
the videos whose row is not up to date (`videobert.videos.is_up_to_date`).
"""

from __future__ import annotations

import logging
import sys
import time

from pipelines.common import init_ray, stage_main
from pipelines.ray_stages import decoded_videos
from videobert import storage, tables
from videobert.config import ExperimentConfig
from videobert.results import ExtractResult, stage_run_id
from videobert.videos import ClipFeatures, ExtractCommitter, plan_extract

log = logging.getLogger("videobert.extract")


def run(config: ExperimentConfig) -> ExtractResult:
    """Extract features for every new or changed video under `source`."""
    # torch is imported here, not at module level, so `--help` and config errors answer at once.
    from videobert.features import encoder_id, load_weights

    started = time.perf_counter()
    storage.check_reachable(config.source, config.s3)
    storage.check_reachable(config.output, config.s3, create=True)
    encoder = encoder_id(config.encoder)
    load_weights(config.encoder, config.s3)  # fail fast (exit 2) when the weights cannot be had

    plan = plan_extract(config, encoder)
    tables.upsert_manifest(config.output, plan.relinked, config.s3)
    layout = tables.Layout(config.output)
    result = ExtractResult(
        run_id=stage_run_id("extract"),
        listed=len(plan.videos),
        skipped=len(plan.videos) - len(plan.todo),
        relinked=len(plan.relinked),
        encoder=encoder,
        features=layout.features,
        manifest=layout.videos,
    )
    committer = ExtractCommitter(config, plan.todo, result, encoder, plan.manifest)
    if plan.todo:
        init_ray()
        log.info("extracting %d videos (%d up to date)", len(plan.todo), result.skipped)
        for video in decoded_videos(config, plan.todo, ClipFeatures):
            committer.commit_video(video)
    committer.flush()
    tables.maintain(layout.videos, config.s3)
    result.seconds = time.perf_counter() - started
    print(result.report(), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    return stage_main("extract", run, argv)


if __name__ == "__main__":
    sys.exit(main())
