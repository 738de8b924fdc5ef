"""`videobert evaluate`: score a registered model version on held-out and labelled videos.

Held-out MLM accuracy, alignment accuracy/AUC and text->video retrieval on the hash hold-out
of `tokens/`; zero-shot classification on every video that `evaluate.labels` names, wherever
it lives (under `source` or not). Every metric is logged to MLflow in an evaluation run linked
to the model version, and written onto the version as `eval.<metric>` tags (what `promote`
compares). A markdown report with plots is logged as an artifact.

Before scoring, the labelled videos get their own tables under
`<output>/evalsets/<digest>/` (`videobert.evaluation.evalset_root`), which neither tokenize
nor pretrain reads:
1. extract's code (pipelines/labelled_sets.py, shared with finetune-classify): a labelled video
   that extract already made features of is copied, any other is decoded and encoded by
   `ray_stages.decoded_videos` and committed by `ExtractCommitter`; one whose row is up to
   date (`is_up_to_date`) is left alone;
2. tokenize's code: `plan_tokenize`, the `TokenShardWriter` actors and `record_tokenized`,
   with the model's own codebook and tokenizer.
A labelled video that cannot be read (no such object, not a video) is named in the log, in
the run's `unreadable_labelled_videos.json` artifact and `unreadable_labelled_videos` tag;
the others are scored all the same. The scoring runs as one Ray task, so it lands on a GPU
node when the cluster has one.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from pipelines.common import init_ray, stage_main
from pipelines.labelled_sets import extract_labelled
from pipelines.ray_stages import tokenized_videos
from videobert.config import ExperimentConfig, parse_model_uri
from videobert.metrics import combined_metric
from videobert.results import (
    CodebookResult,
    EvaluationResult,
    MissingInputError,
    TokenizerResult,
)

if TYPE_CHECKING:  # mlflow loads only when the stage runs
    from mlflow import MlflowClient

    from videobert.registry import ModelVersionInfo

log = logging.getLogger("videobert.evaluate")

UNREADABLE_TAG = "unreadable_labelled_videos"


def prepare_labelled(config: ExperimentConfig, model: ModelVersionInfo) -> dict[str, str]:
    """Extract and tokenize the labelled videos not yet done, into the evalset's tables, with
    the model's codebook and tokenizer; returns source_uri -> why for each that cannot be read."""
    from videobert.evaluation import plan_evalset, unreadable_labelled_videos
    from videobert.features import encoder_id
    from videobert.tables import Layout
    from videobert.token_shards import plan_tokenize, record_tokenized

    encoder = encoder_id(config.encoder)
    plan = plan_evalset(config, encoder)
    evalset = extract_labelled(config, plan, encoder, "evaluate")

    # The model's own codebook and tokenizer: its visual words and text ids mean what it learned.
    meta, layout = model.metadata, Layout(config.output)
    cb_version, tok_version = meta["codebook_version"], meta["tokenizer_version"]
    codebook = CodebookResult(
        meta.get("codebook_uri") or layout.codebook(cb_version), cb_version, model.num_visual
    )
    tokenizer = TokenizerResult(meta.get("tokenizer_uri") or layout.tokenizer(tok_version), tok_version)
    tokens = plan_tokenize(evalset, codebook, tokenizer)
    token_errors: dict[str, str] = {}
    if tokens.videos.num_rows:
        log.info("tokenizing %d labelled videos into %s", tokens.videos.num_rows, tokens.result.tokens_uri)
        statuses = tokenized_videos(evalset, tokens.items(), codebook.uri, tokenizer.uri)
        record_tokenized(evalset, tokens, statuses)
        token_errors = {s["video_id"]: s["error"] for s in statuses if s["error"]}
    return unreadable_labelled_videos(config, plan, token_errors)


def record_missing_metric(
    client: MlflowClient,
    name: str,
    version: str,
    config: ExperimentConfig,
    metrics: dict[str, float],
    unreadable: dict[str, str],
) -> None:
    """Say on the version why its evaluation has no `evaluate.metric` (promote's message names
    the cause); a later evaluation that has it clears the tag."""
    from videobert.registry import MISSING_METRIC_TAG

    metric = config.evaluate.metric
    if metric in metrics:
        if MISSING_METRIC_TAG in client.get_model_version(name, version).tags:
            client.delete_model_version_tag(name, version, MISSING_METRIC_TAG)
        return
    missing = metric
    if metric == config.evaluate.combined_metric:  # name the part that is missing
        missing = next((m for m in config.evaluate.combined_weights if m not in metrics), metric)
    if not missing.startswith("zero_shot"):
        cause = f"evaluate computed no {missing}"
    elif not config.evaluate.labels:
        cause = "evaluate.labels is not set, so no video was scored zero-shot"
    else:
        cause = f"no labelled video in {config.evaluate.labels} could be scored"
        if unreadable:
            names = ", ".join(list(unreadable)[:3]) + (", ..." if len(unreadable) > 3 else "")
            cause += f" ({len(unreadable)} not scored: {names})"
    client.set_model_version_tag(name, version, MISSING_METRIC_TAG, cause)
    log.warning("%s v%s has no %s: %s", name, version, metric, cause)


def run(config: ExperimentConfig) -> EvaluationResult:
    """Evaluate the version `evaluate.model_uri` names, in one Ray task (a GPU when there is one)."""
    import mlflow
    import ray

    from videobert.evaluation import PREFIX_TAG, evaluate_model
    from videobert.registry import alias_version, record_evaluation, resolve_model_version
    from videobert.tracking import setup_experiment

    setup_experiment(config)
    name, alias, _ = parse_model_uri(config.evaluate.model_uri)
    client = mlflow.MlflowClient()
    version = alias_version(client, name, alias)
    if version is None:
        raise MissingInputError(f"no `{alias}` version of model {name!r}: run `videobert pretrain` first")
    model_uri = f"models:/{name}/{version}"

    init_ray()
    unreadable: dict[str, str] = {}
    if config.evaluate.labels:
        unreadable = prepare_labelled(config, resolve_model_version(model_uri))
    use_gpu = bool(ray.cluster_resources().get("GPU", 0))
    remote = ray.remote(num_gpus=1 if use_gpu else 0)(evaluate_model)
    # The worker gets the registry this driver resolved: its own environment (what the cluster
    # was started with) may name another tracking server.
    task_config = replace(config, mlflow=replace(config.mlflow, tracking_uri=mlflow.get_tracking_uri()))
    metrics, plots, meta = ray.get(remote.remote(task_config, model_uri))
    # A video read fine but left without visual words is as unscored as an unreadable one.
    unreadable = dict(sorted({**meta.pop("unscored_labelled_videos", {}), **unreadable}.items()))

    finite = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
    combined = combined_metric(finite, config.evaluate.combined_weights)
    if combined is not None:
        finite[config.evaluate.combined_metric] = combined
    run_id = record_evaluation(name, version, finite, plots, meta)
    if "zero_shot_template" in meta:  # the words zero-shot asked in (evaluate.zero_shot_prefix)
        client.set_tag(run_id, "zero_shot_template", meta["zero_shot_template"])
        client.set_model_version_tag(name, version, PREFIX_TAG, meta["zero_shot_prefix"])
        log.info("zero-shot template: %s", meta["zero_shot_template"])
    if config.evaluate.labels:
        client.set_tag(run_id, UNREADABLE_TAG, str(len(unreadable)))
        client.log_text(run_id, json.dumps(unreadable, indent=1), f"evaluation/{UNREADABLE_TAG}.json")
    for uri, reason in unreadable.items():
        log.warning("labelled video not scored: %s: %s", uri, reason)
    record_missing_metric(client, name, version, config, finite, unreadable)
    summary = ", ".join(f"{k}={v:.3f}" for k, v in sorted(finite.items()))
    print(f"evaluate: {name} v{version}: {summary}")
    if unreadable:
        print(f"evaluate: {len(unreadable)} labelled videos not scored: " + ", ".join(sorted(unreadable)))
    return EvaluationResult(name, version, run_id, finite, unreadable=unreadable)


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", run, argv)


if __name__ == "__main__":
    sys.exit(main())
