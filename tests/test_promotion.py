"""The champion alias moves only when the evaluation says so (real MLflow stores)."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from videobert.registry import CHAMPION, alias_version, eval_tag, promote
from videobert.tracking import use_tracking_uri

METRIC = "zero_shot_object_top1"


def _new_version(client: MlflowClient, name: str, score: float | None) -> str:
    """A real registered version (an artifact logged in a run), optionally with an eval score."""
    with mlflow.start_run() as run:
        mlflow.log_text("weights would be here", "model/README.txt")
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id).version
    if score is not None:
        client.set_model_version_tag(name, version, eval_tag(METRIC), str(score))
    return version


def _check_promotion_rules(client: MlflowClient, name: str) -> None:
    first = _new_version(client, name, 0.30)
    decision = promote(client, name, first, METRIC)
    assert decision.promoted and decision.reason == "no champion yet"
    assert alias_version(client, name, CHAMPION) == first

    worse = _new_version(client, name, 0.20)
    decision = promote(client, name, worse, METRIC)
    assert not decision.promoted
    assert alias_version(client, name, CHAMPION) == first
    tags = client.get_model_version(name, worse).tags
    assert tags["promotion.decision"] == "rejected"
    assert float(tags["promotion.candidate_score"]) == pytest.approx(0.20)
    assert float(tags["promotion.champion_score"]) == pytest.approx(0.30)

    tie = _new_version(client, name, 0.30)
    assert not promote(client, name, tie, METRIC).promoted  # ties keep the champion

    better = _new_version(client, name, 0.55)
    decision = promote(client, name, better, METRIC)
    assert decision.promoted and decision.champion_version == first
    assert alias_version(client, name, CHAMPION) == better
    assert client.get_model_version(name, better).tags["promotion.decision"] == "promoted"

    # Promoting again is a no-op; an unevaluated version moves nothing and says why.
    assert promote(client, name, better, METRIC).promoted
    unevaluated = _new_version(client, name, None)
    decision = promote(client, name, unevaluated, METRIC)
    assert not decision.promoted and "videobert evaluate" in decision.reason
    assert client.get_model_version(name, unevaluated).tags["promotion.decision"] == "not evaluated"
    assert alias_version(client, name, CHAMPION) == better


def test_promotion_on_sqlite(tmp_path):
    use_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("promotion")
    try:
        _check_promotion_rules(MlflowClient(), "videobert-sqlite")
    finally:
        mlflow.set_tracking_uri(None)


def test_promotion_on_live_server(mlflow_server):
    use_tracking_uri(mlflow_server)
    mlflow.set_experiment("promotion")
    try:
        _check_promotion_rules(MlflowClient(), "videobert-server")
    finally:
        mlflow.set_tracking_uri(None)
