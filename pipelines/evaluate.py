"""`videobert evaluate`: score a registered model version on held-out videos.

Held-out MLM accuracy, alignment accuracy/AUC, text->video retrieval and zero-shot
classification (labels from `evaluate.labels`). Every metric is logged to MLflow in an
evaluation run linked to the model version, and written onto the version as `eval.<metric>`
tags (what `promote` compares). A markdown report with plots is logged as an artifact.
The work runs as one Ray task, so it lands on a GPU node when the cluster has one.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace

import numpy as np

from pipelines.common import init_ray, stage_main
from videobert.config import ExperimentConfig, parse_model_uri
from videobert.results import EvaluationResult, MissingInputError

log = logging.getLogger("videobert.evaluate")


def run(config: ExperimentConfig) -> EvaluationResult:
    """Evaluate the version `evaluate.model_uri` names, in one Ray task (a GPU when there is one)."""
    import mlflow
    import ray

    from videobert.evaluation import evaluate_model
    from videobert.registry import alias_version, record_evaluation
    from videobert.tracking import setup_experiment

    setup_experiment(config)
    name, alias, _ = parse_model_uri(config.evaluate.model_uri)
    version = alias_version(mlflow.MlflowClient(), name, alias)
    if version is None:
        raise MissingInputError(f"no `{alias}` version of model {name!r}: run `videobert pretrain` first")

    init_ray()
    use_gpu = bool(ray.cluster_resources().get("GPU", 0))
    remote = ray.remote(num_gpus=1 if use_gpu else 0)(evaluate_model)
    # The worker gets the registry this driver resolved: its own environment (what the cluster
    # was started with) may name another tracking server.
    task_config = replace(config, mlflow=replace(config.mlflow, tracking_uri=mlflow.get_tracking_uri()))
    metrics, plots, meta = ray.get(remote.remote(task_config, f"models:/{name}/{version}"))

    finite = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
    run_id = record_evaluation(name, version, finite, plots, meta)
    summary = ", ".join(f"{k}={v:.3f}" for k, v in sorted(finite.items()))
    print(f"evaluate: {name} v{version}: {summary}")
    return EvaluationResult(name, version, run_id, finite)


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", run, argv)


if __name__ == "__main__":
    sys.exit(main())
