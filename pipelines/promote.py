"""`videobert promote`: move the `champion` alias to the candidate if its evaluation wins."""

from __future__ import annotations

import sys

from mlflow import MlflowClient

from pipelines.common import stage_main
from videobert.config import ConfigError, ExperimentConfig
from videobert.registry import CANDIDATE, PromotionDecision, alias_version, promote
from videobert.tracking import setup_experiment


def run(config: ExperimentConfig) -> PromotionDecision:
    setup_experiment(config)
    client = MlflowClient()
    name = config.mlflow.registered_model
    version = alias_version(client, name, CANDIDATE)
    if version is None:
        raise ConfigError(f"no `{CANDIDATE}` version of model {name!r}: run `videobert pretrain` first")
    decision = promote(client, name, version, config.evaluate.metric)
    verdict = "promoted to champion" if decision.promoted else "kept the current champion"
    print(f"promote: {name} v{version} {verdict} ({decision.reason})")
    return decision


def main(argv: list[str] | None = None) -> int:
    return stage_main("promote", run, argv)


if __name__ == "__main__":
    sys.exit(main())
