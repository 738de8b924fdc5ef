"""`videobert run`: extract -> fit-codebook -> tokenize -> pretrain -> evaluate -> promote
(-> finetune-classify, when `finetune.labels` is set; -> finetune-caption, when `finetune.captions` is).

Each stage hands its typed result (videobert/results.py) to the next one, and decides for
itself whether there is work, so the whole pipeline is safe to rerun at any time:
- extract and tokenize are incremental (only new or changed videos);
- fit-codebook reuses the newest codebook unless `codebook.refit` is set;
- pretrain is skipped when the candidate was trained on exactly these token shards with the
  same settings, and a killed pretrain resumes, because its run name is derived from both;
- evaluate is skipped when the candidate already has an evaluation; promote is idempotent;
- finetune-classify (finetune-caption) trains nothing when the classifiers' (captioners')
  candidate was built on the same pretrained version (the champion by default), table and settings.
A second run over unchanged inputs therefore does nothing beyond these checks.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from pipelines import (
    evaluate,
    extract,
    finetune_caption,
    finetune_classify,
    fit_codebook,
    pretrain,
    promote,
    tokenize,
)
from pipelines.common import init_ray, stage_main
from videobert.config import ExperimentConfig, parse_model_uri
from videobert.results import EvaluationResult

log = logging.getLogger("videobert.run")


def run(config: ExperimentConfig) -> dict[str, Any]:
    """Every stage in order; returns each stage's result by name."""
    from mlflow import MlflowClient

    from videobert.registry import CANDIDATE, CHAMPION, EVAL_RUN_TAG, alias_version, version_tags
    from videobert.tracking import setup_experiment, tracking_uri

    started = time.perf_counter()
    init_ray()
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}

    def stage(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        log.info("=== %s ===", name)
        t0 = time.perf_counter()
        results[name] = fn(*args)
        timings[name] = time.perf_counter() - t0
        return results[name]

    stage("extract", extract.run, config)
    codebook = stage("fit-codebook", fit_codebook.run, config)
    tokens = stage("tokenize", tokenize.run, config, codebook)
    trained = stage("pretrain", pretrain.run, config, tokens)

    setup_experiment(config)
    client = MlflowClient()
    tags = version_tags(client, trained.model_name, CANDIDATE)
    if EVAL_RUN_TAG in tags:
        log.info("evaluate: candidate v%s already evaluated (run %s)", tags["version"], tags[EVAL_RUN_TAG])
        results["evaluate"] = EvaluationResult(
            trained.model_name, tags["version"], tags[EVAL_RUN_TAG], skipped=True
        )
    else:
        stage("evaluate", evaluate.run, config)
    decision = stage("promote", promote.run, config)
    classifier = captioner = None
    name, alias, _ = parse_model_uri(str(config.finetune.model_uri))
    pretrained_ready = not alias or alias_version(client, name, alias) is not None
    if config.finetune.labels:
        if not pretrained_ready:  # e.g. no candidate evaluated yet
            log.warning("finetune-classify: no `%s` version of %s to build a classifier on yet", alias, name)
        else:
            classifier = stage("finetune-classify", finetune_classify.run, config)
    if config.finetune.captions:
        if not pretrained_ready:
            log.warning("finetune-caption: no `%s` version of %s to build a captioner on yet", alias, name)
        else:
            captioner = stage("finetune-caption", finetune_caption.run, config)

    total = time.perf_counter() - started
    spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    champion = alias_version(client, trained.model_name, CHAMPION)
    verdict = "promoted" if decision.promoted else "kept champion"
    print(f"\nvideobert run finished in {total:.0f} s ({spent})")
    print(f"  outputs:       {config.output}")
    print(f"  model:         models:/{trained.model_name}@{CHAMPION} (v{champion})")
    print(f"  last decision: v{decision.version} {verdict} ({decision.reason})")
    if classifier is not None:
        top1 = classifier.metrics.get("test_top1", 0.0)
        how = "already built" if classifier.skipped else f"test top-1 {top1:.3f}"
        print(f"  classifier:    {classifier.model_uri} on {classifier.pretrained_uri} ({how})")
    if captioner is not None:
        cider = captioner.metrics.get("test_cider", 0.0)
        how = "already built" if captioner.skipped else f"test CIDEr {cider:.3f}"
        print(f"  captioner:     {captioner.model_uri} on {captioner.pretrained_uri} ({how})")
    print(f"  open MLflow:   mlflow ui --backend-store-uri {tracking_uri(config)}")
    return results


def main(argv: list[str] | None = None) -> int:
    return stage_main("run", run, argv)


if __name__ == "__main__":
    sys.exit(main())
