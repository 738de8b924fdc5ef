"""MLflow runs: where they are tracked, the pretraining run's lifecycle, its metrics and lineage.

Tracking URI, in order: `mlflow.tracking_uri` in the config, else MLFLOW_TRACKING_URI, else a
SQLite file beside the outputs (`<output>/mlflow.db`) for a local output. An s3:// output
cannot hold SQLite, so then the store is `./mlflow.db` in the working directory (logged).

The model registry (the logged pyfunc model, aliases, promotion) is in videobert/registry.py.
mlflow is imported inside the functions, so importing this module stays cheap for Ray drivers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from videobert import storage
from videobert.config import ExperimentConfig, check_uri, flat_params, redact
from videobert.results import token_digest
from videobert.storage import ObjectInfo
from videobert.tables import Layout

if TYPE_CHECKING:
    from videobert.codebook import HierarchicalCodebook
    from videobert.results import TokenizeResult

log = logging.getLogger(__name__)

RUN_NAME_TAG = "videobert.train_run"  # the Ray Train run name: a rerun continues the same MLflow run
LOSS_CURVE_KEYS = ("loss", "mlm_loss_text", "mlm_loss_video", "mlm_loss_joint", "align_loss")
ENV_URIS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


# -- where runs are tracked -------------------------------------------------------------------


def tracking_uri(config: ExperimentConfig) -> str:
    """Where MLflow runs of this experiment are tracked (see the module docstring).

    A URI with credentials is refused (ConfigError): the URI is logged, printed and handed to
    Ray workers, so the login belongs in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
    """
    if config.mlflow.tracking_uri:
        check_uri("mlflow.tracking_uri", config.mlflow.tracking_uri)
        return config.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        check_uri("environment variable MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
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


# -- the pretraining run ----------------------------------------------------------------------


def start_or_resume_run(config: ExperimentConfig, run_name: str, stage: str = "pretrain") -> tuple[str, bool]:
    """The MLflow run of this training run name (pretrain's Ray Train run, finetune-classify's):
    the existing one on a rerun, else a new one tagged with `stage`.

    Returns (run_id, resumed). Config params are logged once, when the run is created.
    """
    import mlflow

    experiment_id = setup_experiment(config)
    client = mlflow.MlflowClient()
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, "stage": stage})
    params = {k: ("" if v is None else str(v))[:6000] for k, v in flat_params(config).items()}
    items = list(params.items())
    for start in range(0, len(items), 90):  # log_batch takes at most 100 params
        client.log_batch(
            run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[start : start + 90]]
        )
    return run.info.run_id, False


def log_lineage(
    run_id: str, tokens_uri: str, files: list[ObjectInfo], codebook_version: str, tokenizer_version: str
) -> str:
    """Dataset input with the shards' digest, and codebook/tokenizer versions as tags."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    digest = token_digest(files)
    client = mlflow.MlflowClient()
    for key, value in {
        "codebook_version": codebook_version,
        "tokenizer_version": tokenizer_version,
        "tokens_uri": tokens_uri,
        "tokens_digest": digest,
    }.items():
        client.set_tag(run_id, key, redact(value))
    dataset = MetaDataset(resolve_dataset_source(redact(tokens_uri)), name="tokens", digest=digest)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        mlflow.log_input(dataset, context="training")
    client.update_run(run_id, status="RUNNING")  # leaving the context marked it FINISHED
    return digest


class MetricsLogger:
    """Batched metric logging into one run; used by rank 0 only."""

    def __init__(self, run_id: str, tracking_uri: str) -> None:
        import mlflow

        self.run_id = run_id
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=batch)


def log_loss_curve(
    run_id: str,
    keys: tuple[str, ...] = LOSS_CURVE_KEYS,
    title: str = "VideoBERT pretraining",
    artifact: str = "loss_curve.png",
) -> None:
    """A PNG of the losses (`keys`) over steps, from the run's metric history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    client = mlflow.MlflowClient()
    figure, axis = plt.subplots(figsize=(7, 4))
    for key in keys:
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if history:
            axis.plot([m.step for m in history], [m.value for m in history], label=key)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    client.log_figure(run_id, figure, artifact)
    plt.close(figure)


def log_codebook_run(
    config: ExperimentConfig, codebook: HierarchicalCodebook, directory: str, png: bytes
) -> str:
    """A run of its own with the codebook's params, inertia and files; returns the run id."""
    import tempfile

    import mlflow

    from videobert.codebook import GALLERY_FILE

    setup_experiment(config)
    meta = codebook.metadata_json()
    with mlflow.start_run(run_name=f"{config.name}-codebook-{codebook.version}") as run:
        mlflow.set_tags(
            {"stage": "fit-codebook", "codebook_version": codebook.version, "codebook_uri": redact(directory)}
        )
        mlflow.log_params(
            {
                "k": codebook.k,
                "depth": codebook.depth,
                "dim": codebook.dim,
                "sample_size": meta["sample_size"],
                "seed": meta["seed"],
                "iterations": meta["iterations"],
                "max_points_per_centroid": meta.get("max_points_per_centroid"),
                "init_trials": meta.get("init_trials"),
                "encoder": meta.get("encoder"),
            }
        )
        metrics = {f"inertia_level_{i}": value for i, value in enumerate(codebook.inertia_per_level)}
        mlflow.log_metrics({**metrics, "fit_seconds": meta["fit_seconds"]})
        with tempfile.TemporaryDirectory() as local:
            codebook.save(local)
            with open(os.path.join(local, GALLERY_FILE), "wb") as handle:
                handle.write(png)
            mlflow.log_artifacts(local, artifact_path="codebook")
        return run.info.run_id


def __getattr__(name: str) -> Any:
    # Models registered before the registry moved out of this module pickled their class as
    # videobert.tracking.VideoBertPyfunc; unpickling looks it up here, so they still load.
    if name == "VideoBertPyfunc":
        from videobert.registry import VideoBertPyfunc

        return VideoBertPyfunc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_pretrain_run(
    config: ExperimentConfig, tokens: TokenizeResult, run_name: str, init_model_uri: str | None
) -> str:
    """The MLflow run of this pretraining (continued on a rerun with the same name), with its
    lineage: the token shards as its input dataset, their versions as tags, and `init_from`."""
    import mlflow

    run_id, resumed = start_or_resume_run(config, run_name)
    log_lineage(run_id, tokens.tokens_uri, tokens.files, tokens.codebook.version, tokens.tokenizer.version)
    if init_model_uri:
        mlflow.MlflowClient().set_tag(run_id, "init_from", redact(init_model_uri))
    uri = redact(mlflow.get_tracking_uri())
    log.info("MLflow run %s (%s) at %s", run_id, "continued" if resumed else "new", uri)
    return run_id
