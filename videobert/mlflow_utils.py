"""MLflow helpers shared by the stages that log runs (fit-codebook, pretrain, evaluate).

Tracking URI, in order: `mlflow.tracking_uri` in the config, else MLFLOW_TRACKING_URI, else a
SQLite file beside the outputs (`<output>/mlflow.db`) for a local output. An s3:// output
cannot hold SQLite, so then the store is `./mlflow.db` in the working directory (logged).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from videobert import storage
from videobert.config import ExperimentConfig
from videobert.tables import Layout

log = logging.getLogger(__name__)


def tracking_uri(config: ExperimentConfig) -> str:
    """Where MLflow runs of this experiment are tracked (see the module docstring)."""
    if config.mlflow.tracking_uri:
        return config.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if not storage.is_s3(config.output):
        os.makedirs(config.output, exist_ok=True)
        return f"sqlite:///{os.path.abspath(Layout(config.output).mlflow_db)}"
    fallback = os.path.abspath("mlflow.db")
    log.warning(
        "output %s is on S3 and no MLflow tracking URI is set: tracking in sqlite:///%s "
        "(set mlflow.tracking_uri or MLFLOW_TRACKING_URI to share runs)",
        config.output,
        fallback,
    )
    return f"sqlite:///{fallback}"


def artifact_location(config: ExperimentConfig) -> str | None:
    """Artifact root for a new experiment on a local SQLite store: `<output>/mlartifacts`."""
    uri = tracking_uri(config)
    if uri.startswith("sqlite:") and not storage.is_s3(config.output):
        return os.path.abspath(storage.join(config.output, "mlartifacts"))
    return None


ENV_URIS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def preserved_uri_env() -> Iterator[None]:
    """Put MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI back as they were on leaving."""
    before = {name: os.environ.get(name) for name in ENV_URIS}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def use_tracking_uri(uri: str) -> None:
    """Point MLflow's runs and model registry at `uri`, without touching the environment.

    The registry lives in the same store as the runs (the registered model's lineage links
    to its run). MLflow 3's `set_tracking_uri` / `set_registry_uri` also export the URI as
    MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI, which `tracking_uri()` and MLflow read as the
    user's choice: a second experiment in the same process (or a Ray worker started later)
    would then land in the first one's store. So the variables are put back as they were.
    """
    import mlflow

    with preserved_uri_env():
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)


def setup_experiment(config: ExperimentConfig) -> str:
    """Point MLflow at this experiment's store and experiment; returns the experiment id."""
    import mlflow

    use_tracking_uri(tracking_uri(config))
    experiment = mlflow.get_experiment_by_name(config.mlflow.experiment)
    if experiment is not None:
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
        return experiment.experiment_id
    try:
        experiment_id = mlflow.create_experiment(
            config.mlflow.experiment, artifact_location=artifact_location(config)
        )
    except Exception:  # created concurrently by another stage: use that one
        experiment = mlflow.get_experiment_by_name(config.mlflow.experiment)
        if experiment is None:
            raise
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id
