"""`videobert evaluate`: score a registered model version on held-out videos.

Held-out MLM accuracy, alignment accuracy/AUC, text->video retrieval and zero-shot
classification (labels from `evaluate.labels`). Every metric is logged to MLflow in an
evaluation run linked to the model version, and written onto the version as `eval.<metric>`
tags (what `promote` compares). A markdown report with plots is logged as an artifact.
The work runs as one Ray task, so it lands on a GPU node when the cluster has one.
"""

from __future__ import annotations

import io
import logging
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipelines.common import init_ray, stage_main
from videobert import reports, storage
from videobert.config import ConfigError, ExperimentConfig
from videobert.evaluation import (
    HeldOut,
    ZeroShotItem,
    alignment_metrics,
    in_holdout,
    mlm_metrics,
    retrieval_eval,
    rows_to_columns,
    zero_shot,
)
from videobert.tables import Layout, read_manifest
from videobert.token_shards import read_tokens

log = logging.getLogger("videobert.evaluate")


@dataclass
class EvaluationResult:
    model_name: str
    version: str
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)


def read_labels(uri: str, config: ExperimentConfig) -> pa.Table:
    """The labelled set: CSV or Parquet with source_uri, verb, object."""
    data = storage.read_bytes(uri, config.s3)
    table = (
        storage.read_parquet(uri, config.s3) if uri.endswith(".parquet") else pacsv.read_csv(io.BytesIO(data))
    )
    missing = {"source_uri", "verb", "object"} - set(table.column_names)
    if missing:
        raise ConfigError(f"evaluate.labels {uri}: missing columns {sorted(missing)}")
    return table


def label_classes(config: ExperimentConfig) -> tuple[list[str], list[str]]:
    """Every verb and object of the labelled set: the zero-shot candidates."""
    if not config.evaluate.labels:
        return [], []
    labels = read_labels(config.evaluate.labels, config)
    return sorted(set(map(str, labels["verb"].to_pylist()))), sorted(
        set(map(str, labels["object"].to_pylist()))
    )


def zero_shot_items(config: ExperimentConfig, tokens: pa.Table, video_ids: set[str]) -> list[ZeroShotItem]:
    """Labelled videos among `video_ids`, each with all its visual words in segment order."""
    if not config.evaluate.labels:
        return []
    labels = read_labels(config.evaluate.labels, config)
    manifest = read_manifest(config.output, config.s3)
    by_uri = dict(zip(manifest["source_uri"].to_pylist(), manifest["video_id"].to_pylist(), strict=True))
    items = []
    for row in labels.to_pylist():
        vid = by_uri.get(row["source_uri"])
        if vid is None or vid not in video_ids:
            continue
        rows = tokens.filter(pc.equal(tokens["video_id"], vid))
        words = [w for segment in rows["video_tokens"].to_pylist() for w in segment]
        if words:
            items.append(ZeroShotItem(vid, words, str(row["verb"]), str(row["object"])))
    return items


def evaluate_model(
    config: ExperimentConfig, model_uri: str
) -> tuple[dict[str, float], dict[str, Path], dict]:
    """Load the model, score it on the held-out split; returns metrics, plot files and model info."""
    import torch

    from videobert.registry import load_registered_model
    from videobert.text_tokenizer import TextTokenizer
    from videobert.tracking import tracking_uri, use_tracking_uri

    use_tracking_uri(tracking_uri(config))  # this may run in a Ray worker process
    model, vocab, meta = load_registered_model(model_uri)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    max_len = int(meta.get("max_seq_len", config.model.max_seq_len))
    tokens = read_tokens(config.output, meta["codebook_version"], meta["tokenizer_version"], config.s3)
    held = [in_holdout(v, config.evaluate.holdout_fraction) for v in tokens["video_id"].to_pylist()]
    holdout = tokens.filter(pa.array(held, pa.bool_()))
    if holdout.num_rows == 0:
        raise ConfigError(
            f"no held-out token rows (evaluate.holdout_fraction={config.evaluate.holdout_fraction}, "
            f"{tokens.num_rows} rows in all): raise the fraction or add videos"
        )
    rows: HeldOut = rows_to_columns(holdout)
    metrics: dict[str, float] = {"heldout_segments": float(rows.num_rows)}
    metrics |= mlm_metrics(model, vocab, rows, max_len, seed=config.train.seed)
    align, probabilities, labels = alignment_metrics(model, vocab, rows, max_len, seed=config.train.seed)
    metrics |= align
    retrieval, ranks = retrieval_eval(model, vocab, rows, max_len)
    metrics |= retrieval
    tokenizer = TextTokenizer.load(Layout(config.output).tokenizer(meta["tokenizer_version"]), config.s3)
    items = zero_shot_items(config, holdout, set(rows.columns["video_id"]))
    verbs, objects = label_classes(config)
    zs_metrics, zs_details = zero_shot(model, vocab, tokenizer.encode, items, max_len, verbs, objects)
    metrics |= zs_metrics

    plots_dir = Path(tempfile.mkdtemp(prefix="videobert-eval-"))
    plots: dict[str, Path] = {}
    if len(labels) and len(set(labels.tolist())) == 2:
        plots["alignment_roc.png"] = reports.plot_roc(
            probabilities, labels, plots_dir / "alignment_roc.png"
        )
    if len(ranks):
        plots["retrieval_ranks.png"] = reports.plot_rank_histogram(
            ranks, plots_dir / "retrieval_ranks.png"
        )
    if zs_details:
        plots["zero_shot_objects.png"] = reports.plot_confusion(
            zs_details["object_confusion"],
            zs_details["objects"].tolist(),
            plots_dir / "zero_shot_objects.png",
            "Zero-shot objects",
        )
        plots["zero_shot_verbs.png"] = reports.plot_confusion(
            zs_details["verb_confusion"],
            zs_details["verbs"].tolist(),
            plots_dir / "zero_shot_verbs.png",
            "Zero-shot verbs",
        )
    return metrics, plots, meta


def run(config: ExperimentConfig) -> EvaluationResult:
    import mlflow
    import ray
    from mlflow import MlflowClient

    from videobert.registry import eval_tag
    from videobert.tracking import setup_experiment

    setup_experiment(config)
    client = MlflowClient()
    model_uri = config.evaluate.model_uri
    name, _, ref = model_uri.removeprefix("models:/").partition("@")
    if not model_uri.startswith("models:/") or not ref:
        raise ConfigError(f"evaluate.model_uri must look like models:/<name>@<alias>, got {model_uri!r}")
    version = client.get_model_version_by_alias(name, ref).version
    pinned_uri = f"models:/{name}/{version}"

    init_ray()
    use_gpu = bool(ray.cluster_resources().get("GPU", 0))
    remote = ray.remote(num_gpus=1 if use_gpu else 0)(evaluate_model)
    # The worker gets the registry this driver resolved: its own environment (what the cluster
    # was started with) may name another tracking server.
    task_config = replace(config, mlflow=replace(config.mlflow, tracking_uri=mlflow.get_tracking_uri()))
    metrics, plots, meta = ray.get(remote.remote(task_config, pinned_uri))

    finite = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
    with mlflow.start_run(run_name=f"evaluate-{name}-v{version}") as active:
        mlflow.set_tags({"stage": "evaluate", "model_name": name, "model_version": version})
        model_id = client.get_model_version(name, version).model_id
        mlflow.log_metrics(finite, model_id=model_id) if model_id else mlflow.log_metrics(finite)
        mlflow.log_text(
            reports.markdown_report(
                f"Evaluation of {name} v{version}",
                finite,
                notes={
                    "model": pinned_uri,
                    "codebook": meta["codebook_version"],
                    "tokenizer": meta["tokenizer_version"],
                },
                plots={path.removesuffix(".png").replace("_", " "): path for path in plots},
            ),
            "evaluation/report.md",
        )
        for path in plots.values():
            mlflow.log_artifact(str(path), "evaluation")
    for key, value in finite.items():
        client.set_model_version_tag(name, version, eval_tag(key), f"{value:.6f}")
    client.set_model_version_tag(name, version, "eval.run_id", active.info.run_id)
    summary = ", ".join(f"{k}={v:.3f}" for k, v in sorted(finite.items()))
    print(f"evaluate: {name} v{version}: {summary}")
    return EvaluationResult(name, version, active.info.run_id, finite)


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", run, argv)


if __name__ == "__main__":
    sys.exit(main())
