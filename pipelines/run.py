"""`videobert run`: extract -> fit-codebook -> tokenize -> pretrain -> evaluate -> promote.

Safe to rerun at any time; each stage decides for itself whether there is work:
- extract and tokenize are incremental (only new or changed videos);
- fit-codebook reuses the newest codebook unless `codebook.refit` is set;
- pretrain is skipped when the `candidate` version was trained on exactly the current token
  shards with the same model and training settings (tags `tokens_digest`, `train_digest`);
  a killed pretrain resumes from its checkpoint because the Ray Train run name is derived from
  those digests;
- evaluate is skipped when the candidate already has an evaluation; promote is idempotent.
A second run over unchanged inputs therefore does nothing beyond these checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict
from typing import Any

from mlflow import MlflowClient

from pipelines import evaluate, extract, fit_codebook, pretrain, promote, tokenize
from pipelines.common import init_ray, stage_main
from videobert import storage
from videobert.config import ExperimentConfig
from videobert.registry import CANDIDATE, CHAMPION, alias_version
from videobert.tracking import setup_experiment, token_digest, tracking_uri

log = logging.getLogger("videobert.run")


def train_digest(config: ExperimentConfig) -> str:
    """What makes two pretraining runs the same run: the model and training settings."""
    settings = {
        "model": asdict(config.model),
        "train": asdict(config.train),
        "holdout": config.evaluate.holdout_fraction,
    }
    settings["train"].pop("run_name", None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def candidate_tags(config: ExperimentConfig) -> dict[str, str]:
    client = MlflowClient()
    version = alias_version(client, config.mlflow.registered_model, CANDIDATE)
    if version is None:
        return {}
    return {"version": version, **client.get_model_version(config.mlflow.registered_model, version).tags}


def run(config: ExperimentConfig) -> dict[str, Any]:
    started = time.perf_counter()
    init_ray()
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}

    def stage(name: str, fn: Any, *args: Any) -> Any:
        log.info("=== %s ===", name)
        t0 = time.perf_counter()
        out = fn(*args)
        timings[name] = time.perf_counter() - t0
        results[name] = out
        return out

    stage("extract", extract.run, config)
    stage("fit-codebook", fit_codebook.run, config)
    tokens = stage("tokenize", tokenize.run, config)

    digest = token_digest(storage.list_objects(tokens["tokens_dir"], config.s3, ["parquet"]))
    trained_on = train_digest(config)
    setup_experiment(config)
    tags = candidate_tags(config)
    if tags.get("tokens_digest") == digest and tags.get("train_digest") == trained_on:
        log.info("pretrain: candidate v%s already trained on these tokens and settings", tags["version"])
        results["pretrain"] = {"skipped": True, "version": tags["version"]}
    else:
        if not config.train.run_name:
            # Same inputs and starting point -> same Ray Train run name -> a killed run resumes.
            start = pretrain.starting_point_suffix(pretrain.champion_to_continue_from(config))
            config.train.run_name = f"{config.name}-{digest}-{trained_on}{start}"
        trained = stage("pretrain", pretrain.run, config)
        client = MlflowClient()
        for key, value in (("tokens_digest", digest), ("train_digest", trained_on)):
            client.set_model_version_tag(config.mlflow.registered_model, trained.model_version, key, value)

    tags = candidate_tags(config)
    if "eval.run_id" in tags:
        log.info("evaluate: candidate v%s already evaluated (run %s)", tags["version"], tags["eval.run_id"])
        results["evaluate"] = {"skipped": True, "version": tags["version"]}
    else:
        stage("evaluate", evaluate.run, config)
    decision = stage("promote", promote.run, config)

    total = time.perf_counter() - started
    spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    print(f"\nvideobert run finished in {total:.0f} s ({spent})")
    print(f"  outputs:       {config.output}")
    print(
        f"  model:         models:/{config.mlflow.registered_model}@champion (v{alias_version_or_none(config)})"
    )
    print(
        f"  last decision: v{decision.version} {'promoted' if decision.promoted else 'kept champion'} ({decision.reason})"
    )
    uri = tracking_uri(config)
    print(f"  open MLflow:   mlflow ui --backend-store-uri {uri}")
    return results


def alias_version_or_none(config: ExperimentConfig) -> str | None:
    return alias_version(MlflowClient(), config.mlflow.registered_model, CHAMPION)


def main(argv: list[str] | None = None) -> int:
    return stage_main("run", run, argv)


if __name__ == "__main__":
    sys.exit(main())
