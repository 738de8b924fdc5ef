"""Labelled videos' own tables, made with extract's code: what evaluate (zero-shot) and
finetune-classify (classification) share.

A labelled set (a table of `source_uri`s: `evaluate.labels`, `finetune.labels`) gets its tables
under `<output>/evalsets/<digest of its URI>/` (`videobert.evaluation.evalset_root`). Its videos
are planned by extract's skip rule (`plan_evalset`): features that extract already made of a
video under `source` are copied, any other video is decoded and encoded by `decoded_videos` and
committed by `ExtractCommitter`, one whose row is up to date is left alone. Not a stage: only
stage modules import it.
"""

from __future__ import annotations

import logging

from pipelines.ray_stages import decoded_videos
from videobert.config import ExperimentConfig
from videobert.evaluation import EvalSetPlan
from videobert.results import VideoStageSummary, stage_run_id

log = logging.getLogger("videobert.labelled_sets")


def extract_labelled(
    config: ExperimentConfig, plan: EvalSetPlan, encoder: str, stage: str, labels: str | None = None
) -> ExperimentConfig:
    """Do what `plan` (`plan_evalset` of `labels`, default evaluate.labels) says: copy extract's
    features, rewrite relinked rows, decode and encode the rest into the set's tables. Returns
    the config whose `output` is those tables (`evalset_config`), for tokenize's code."""
    from videobert.evaluation import adopt_extracted, evalset_config
    from videobert.tables import upsert_manifest
    from videobert.videos import ClipFeatures, ExtractCommitter

    evalset = evalset_config(config, labels)
    adopt_extracted(config, plan.adopt, labels)
    upsert_manifest(evalset.output, plan.relinked, config.s3)
    summary = VideoStageSummary(stage, run_id=stage_run_id(stage), listed=len(plan.videos))
    summary.skipped = len(plan.videos) - len(plan.adopt) - len(plan.todo)
    committer = ExtractCommitter(evalset, plan.todo, summary, encoder, plan.manifest)
    if plan.todo:
        log.info("extracting %d labelled videos into %s", len(plan.todo), evalset.output)
        for video in decoded_videos(evalset, plan.todo, ClipFeatures):
            committer.commit_video(video)
    committer.flush()
    return evalset
