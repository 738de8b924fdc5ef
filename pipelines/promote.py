"""`videobert promote`: move the `champion` alias to the candidate if its evaluation wins."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from pipelines.common import stage_main
from videobert.config import ExperimentConfig
from videobert.results import MissingInputError

if TYPE_CHECKING:  # mlflow loads only when the stage runs
    from videobert.registry import PromotionDecision


def run(config: ExperimentConfig) -> PromotionDecision:
    """Compare the candidate with the champion on `evaluate.metric`; returns the decision."""
    from mlflow import MlflowClient

    from videobert.registry import CANDIDATE, alias_version, promote
    from videobert.tracking import setup_experiment

    setup_experiment(config)
    client = MlflowClient()
    name = config.mlflow.registered_model
    version = alias_version(client, name, CANDIDATE)
    if version is None:
        raise MissingInputError(f"no `{CANDIDATE}` version of model {name!r}: run `videobert pretrain` first")
    decision = promote(client, name, version, config.evaluate.metric)
    verdict = "promoted to champion" if decision.promoted else "kept the current champion"
    print(f"promote: {name} v{version} {verdict} ({decision.reason})")
    return decision


def main(argv: list[str] | None = None) -> int:
    return stage_main("promote", run, argv)


if __name__ == "__main__":
    sys.exit(main())
