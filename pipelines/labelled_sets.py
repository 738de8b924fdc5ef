"""Labelled videos' own tables, made with extract's code: what evaluate (zero-shot) and
finetune-classify (classification) share.

A labelled set (a table of `source_uri`s: `evaluate.labels`, `finetune.labels`) gets its tables
under `<output>/evalsets/<digest of its URI>/` (`videobert.evaluation.evalset_root`). Its videos
are planned by extract's skip rule (`plan_evalset`): features that extract already made of a
video under `source` are copied, any other video is decoded and encoded by `decoded_videos` and
committed by `ExtractCommitter`, one whose row is up to date is left alone. Also what the
fine-tuning stages share around their training: the pretrained version and the plan
(`finetune_inputs`), the skip (`already_built`) and the new version's evaluation tags, cards and
promotion (`evaluate_and_promote`). Not a stage: only stage modules import it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.ray_stages import decoded_videos
from videobert.config import ExperimentConfig
from videobert.evaluation import EvalSetPlan
from videobert.results import FinetuneResult, VideoStageSummary, stage_run_id

if TYPE_CHECKING:
    from videobert.registry import ModelVersionInfo, PromotionDecision

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


@dataclass
class FinetuneInputs:
    """What a fine-tuning stage builds on: the pinned pretrained version, the encoder id, the
    version's codebook, and the plan of its table's videos (`plan_evalset`)."""

    pretrained: ModelVersionInfo
    encoder: str
    codebook_uri: str
    plan: EvalSetPlan


def finetune_inputs(config: ExperimentConfig, table_uri: str) -> FinetuneInputs:
    """`finetune.model_uri` resolved to one version that takes raw video, decoded as this config
    decodes, its codebook, and the plan of `table_uri`'s videos; MLflow set up."""
    from videobert.classification import check_decode
    from videobert.classifier import check_takes_video
    from videobert.embedding import model_codebook
    from videobert.evaluation import plan_evalset
    from videobert.features import encoder_id
    from videobert.registry import resolve_model_version
    from videobert.tracking import setup_experiment

    setup_experiment(config)
    pretrained = resolve_model_version(str(config.finetune.model_uri))
    check_takes_video(pretrained)
    encoder = encoder_id(config.encoder)
    codebook_uri, _ = model_codebook(pretrained, config, encoder)
    check_decode(config, pretrained.uri, pretrained.metadata)
    return FinetuneInputs(pretrained, encoder, codebook_uri, plan_evalset(config, encoder, table_uri))


def already_built(
    config: ExperimentConfig, stage: str, name: str, trained_on: dict[str, str], pretrained_uri: str
) -> FinetuneResult | None:
    """The skipped result when `name`'s candidate was trained on exactly `trained_on`, else None."""
    from mlflow import MlflowClient

    from videobert.registry import CHAMPION, alias_version, already_trained

    done = already_trained(config, trained_on, name)
    if done is None:
        return None
    print(f"{stage}: {name} v{done} is already built on {pretrained_uri} with this table and settings")
    champion = str(alias_version(MlflowClient(), name, CHAMPION)) == str(done)
    return FinetuneResult(name, str(done), pretrained_uri, promoted=champion, skipped=True)


def evaluate_and_promote(
    name: str,
    version: str,
    run_id: str,
    metrics: dict[str, float],
    metric: str,
    card: Callable[..., str],
    model_card: str,
) -> PromotionDecision:
    """A new fine-tuned version's `eval.*` tags and model cards, then `champion` moved on
    `metric` (`registry.promote`); the run is marked finished."""
    from mlflow import MlflowClient

    from videobert.registry import EVAL_RUN_TAG, describe_version, eval_tag, promote

    client = MlflowClient()
    for key, value in metrics.items():
        client.set_model_version_tag(name, version, eval_tag(key), f"{value:.6f}")
    client.set_model_version_tag(name, version, EVAL_RUN_TAG, run_id)
    describe_version(client, name, version, card=card, model_card=model_card)
    decision = promote(client, name, version, metric)
    client.set_terminated(run_id, "FINISHED")
    return decision
