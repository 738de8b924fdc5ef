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


def test_a_missing_metric_is_not_evaluated_with_its_cause(tmp_path):
    """A candidate evaluated without `evaluate.metric` (its labelled videos could not be
    scored): promote records "not evaluated", moves no alias, exits 0, and says why."""
    from pipelines import evaluate
    from pipelines import promote as promote_stage
    from videobert.config import load_config
    from videobert.registry import CANDIDATE, EVAL_RUN_TAG

    name = "videobert-missing"
    store = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [
        f"output={tmp_path}",
        f"mlflow.tracking_uri={store}",
        f"mlflow.registered_model={name}",
        f"evaluate.metric={METRIC}",
    ]
    config = load_config(None, [*overrides, f"evaluate.labels={tmp_path}/labels.csv"])
    use_tracking_uri(store)
    mlflow.set_experiment(config.mlflow.experiment)
    try:
        client = MlflowClient()
        champion = _new_version(client, name, 0.30)
        assert promote(client, name, champion, METRIC).promoted
        candidate = _new_version(client, name, None)
        client.set_registered_model_alias(name, CANDIDATE, candidate)
        client.set_model_version_tag(name, candidate, EVAL_RUN_TAG, "run-without-zero-shot")
        lost = {"s3://videos/a.mp4": "read: no such object", "/data/b.mp4": "decode: not a video"}
        evaluate.record_missing_metric(client, name, candidate, config, {"heldout_segments": 3.0}, lost)

        decision = promote_stage.run(config)
        assert not decision.promoted
        assert "no labelled video" in decision.reason and "s3://videos/a.mp4" in decision.reason
        assert "run-without-zero-shot" in decision.reason
        tags = client.get_model_version(name, candidate).tags
        assert tags["promotion.decision"] == "not evaluated" and tags["promotion.reason"] == decision.reason
        assert alias_version(client, name, CHAMPION) == champion
        assert alias_version(client, name, CANDIDATE) == candidate
        assert promote_stage.main([f"--set={o}" for o in overrides]) == 0

        # Without a labelled set the cause is that; a later evaluation with the metric clears it.
        evaluate.record_missing_metric(client, name, candidate, load_config(None, overrides), {}, {})
        assert "evaluate.labels is not set" in promote(client, name, candidate, METRIC).reason
        evaluate.record_missing_metric(client, name, candidate, config, {METRIC: 0.5}, {})
        assert "evaluation.missing" not in client.get_model_version(name, candidate).tags
    finally:
        mlflow.set_tracking_uri(None)


def test_the_combined_metric_weighs_alignment_and_names_its_missing_part(tmp_path):
    """Promotion's default metric is the configured weighted mean; a part that is missing
    leaves it missing (a partial evaluation never wins), and the cause names that part."""
    from pipelines import evaluate
    from videobert.config import ConfigError, load_config
    from videobert.metrics import combined_metric

    config = load_config(None, ["evaluate.combined_weights={alignment_auc: 3, zero_shot_object_top1: 1}"])
    assert config.evaluate.metric == config.evaluate.combined_metric == "videobert_score"
    weights = config.evaluate.combined_weights
    assert combined_metric({"alignment_auc": 0.9, "zero_shot_object_top1": 0.5}, weights) == pytest.approx(
        0.8
    )
    # object accuracy alone does not make a champion: a model at chance on alignment scores lower
    assert combined_metric({"alignment_auc": 0.5, "zero_shot_object_top1": 1.0}, weights) < 0.8
    assert combined_metric({"zero_shot_object_top1": 1.0}, weights) is None
    assert combined_metric({"alignment_auc": float("nan"), "zero_shot_object_top1": 1.0}, weights) is None
    for bad in ("{a: -1}", "{}", "[1, 2]"):
        with pytest.raises(ConfigError, match="combined_weights"):
            load_config(None, [f"evaluate.combined_weights={bad}"])

    store = f"sqlite:///{tmp_path}/mlflow.db"
    use_tracking_uri(store)
    mlflow.set_experiment(config.mlflow.experiment)
    try:
        client = MlflowClient()
        version = _new_version(client, "videobert-combined", None)
        evaluate.record_missing_metric(
            client, "videobert-combined", version, config, {"zero_shot_object_top1": 1.0}, {}
        )
        cause = client.get_model_version("videobert-combined", version).tags["evaluation.missing"]
        assert "alignment_auc" in cause
    finally:
        mlflow.set_tracking_uri(None)
