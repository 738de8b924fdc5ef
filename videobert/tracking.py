"""MLflow for pretraining: run params and lineage, metrics from rank 0, the registered model.

The registered model is an MLflow pyfunc whose artifacts are plain files written by us:
`model.safetensors` (consolidated fp32 weights), `config.json` (the model shape),
`vocab.json` (the joint vocabulary), `metadata.json` (codebook / tokenizer versions and URIs)
and `experiment.yaml` (the whole config). No pickled tensors and no torch.export (which would
fix the sequence length): `predict` takes token sequences of any length up to max_positions.
The python model class is pickled by reference, and the `videobert` package travels with the
model as code (`code_paths`) so it loads where the package is not installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

import videobert
from videobert.config import ConfigError, ExperimentConfig, config_to_yaml, flat_params
from videobert.model import (
    MASK,
    VIDEO_SEP,
    VIDEO_TYPE,
    JointVocab,
    VideoBert,
    VideoBertConfig,
    load_pretrained,
    save_pretrained,
)
from videobert.storage import ObjectInfo

log = logging.getLogger(__name__)

RUN_NAME_TAG = "videobert.train_run"  # the Ray Train run name: a rerun continues the same MLflow run
CANDIDATE_ALIAS = "candidate"
MODEL_FILES_DIR = "videobert"  # our plain files' folder among the logged pyfunc's artifacts
LOSS_CURVE_KEYS = ("loss", "mlm_loss_text", "mlm_loss_video", "mlm_loss_joint", "align_loss")


def token_digest(files: list[ObjectInfo]) -> str:
    """Content digest of the token shards from their names, sizes and ETags (no data read)."""
    digest = hashlib.sha256()
    for info in sorted(files, key=lambda f: f.uri):
        digest.update(f"{info.uri.rsplit('/', 1)[-1]}\t{info.size}\t{info.etag}\n".encode())
    return digest.hexdigest()[:20]


def start_or_resume_run(config: ExperimentConfig, run_name: str) -> tuple[str, bool]:
    """The MLflow run for this Ray Train run name: the existing one on a rerun, else a new one.

    Returns (run_id, resumed). Config params are logged once, when the run is created.
    """
    import mlflow

    from videobert.mlflow_utils import setup_experiment

    experiment_id = setup_experiment(config)
    client = mlflow.MlflowClient()
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    run = client.create_run(
        experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, "stage": "pretrain"}
    )
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
        client.set_tag(run_id, key, value)
    dataset = MetaDataset(resolve_dataset_source(tokens_uri), name="tokens", digest=digest)
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


def log_loss_curve(run_id: str) -> None:
    """A PNG of the losses over steps, from the run's metric history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    client = mlflow.MlflowClient()
    figure, axis = plt.subplots(figsize=(7, 4))
    for key in LOSS_CURVE_KEYS:
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if history:
            axis.plot([m.step for m in history], [m.value for m in history], label=key)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title("VideoBERT pretraining")
    axis.legend()
    figure.tight_layout()
    client.log_figure(run_id, figure, "loss_curve.png")
    plt.close(figure)


class VideoBertPyfunc(mlflow.pyfunc.PythonModel):
    """`predict`: token sequences of any length -> embeddings, MLM and alignment scores.

    Input: a DataFrame with `input_ids` (joint ids, a list per row) and optionally
    `token_type_ids` (else derived: video after `[>]` or for visual-word ids).
    Output per row: `embedding` (mean of the last hidden states), `cls_embedding`,
    `alignment_score` (probability that text and video are aligned), and at each `[MASK]`:
    `mlm_predictions` (joint ids) and `mlm_scores` (their probabilities).
    """

    def load_context(self, context: Any) -> None:
        root = Path(context.artifacts["model"])
        self.model, self.vocab = load_pretrained(root)
        self.metadata = json.loads((root / "metadata.json").read_text())

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return predict_frame(self.model, self.vocab, model_input)


def _token_types(ids: np.ndarray, vocab: JointVocab) -> np.ndarray:
    """Token types as the example builder sets them: video after `[>]`, all video when no text."""
    if (ids == VIDEO_SEP).any():
        return np.where(np.arange(len(ids)) > np.argmax(ids == VIDEO_SEP), VIDEO_TYPE, 0)
    has_text = ((ids >= vocab.text_offset) & ~vocab.is_video(ids)).any()
    return np.full(len(ids), 0 if has_text or not vocab.is_video(ids).any() else VIDEO_TYPE)


@torch.no_grad()
def predict_frame(model: VideoBert, vocab: JointVocab, frame: pd.DataFrame) -> pd.DataFrame:
    """Run the model on a DataFrame of variable-length sequences (one padded batch)."""
    sequences = [np.asarray(ids, np.int64) for ids in frame["input_ids"]]
    if not sequences or min(len(s) for s in sequences) == 0:
        raise ValueError("every row needs a non-empty input_ids list")
    if "token_type_ids" in frame:
        types = [np.asarray(t, np.int64) for t in frame["token_type_ids"]]
    else:
        types = [_token_types(s, vocab) for s in sequences]
    width = max(len(s) for s in sequences)
    ids = np.zeros((len(sequences), width), np.int64)
    type_ids = np.zeros_like(ids)
    seq_ids = np.zeros_like(ids)  # one sequence per row; 0 marks padding
    for row, (s, t) in enumerate(zip(sequences, types, strict=True)):
        ids[row, : len(s)], type_ids[row, : len(s)], seq_ids[row, : len(s)] = s, t, 1
    device = next(model.parameters()).device
    tensors = [torch.as_tensor(a, device=device) for a in (ids, type_ids, seq_ids)]
    hidden = model.encode(tensors[0], tensors[1], seq_ids=tensors[2])  # [R, T, H]
    real = tensors[2].unsqueeze(-1).float()  # [R, T] -> [R, T, 1]
    embedding = (hidden * real).sum(1) / real.sum(1)
    cls_positions = torch.arange(len(sequences), device=device) * width
    alignment = torch.sigmoid(model.alignment_logits(hidden, cls_positions))
    mask_positions = torch.nonzero((tensors[0] == MASK).reshape(-1)).squeeze(-1)
    predictions, scores = [[] for _ in sequences], [[] for _ in sequences]
    if mask_positions.numel():
        probabilities = torch.softmax(model.mlm_logits(hidden, mask_positions).float(), -1)
        best, best_ids = probabilities.max(-1)
        for position, token, score in zip(
            mask_positions.tolist(), best_ids.tolist(), best.tolist(), strict=True
        ):
            predictions[position // width].append(int(token))
            scores[position // width].append(float(score))
    return pd.DataFrame(
        {
            "embedding": [e.tolist() for e in embedding.float().cpu().numpy()],
            "cls_embedding": [h[0].tolist() for h in hidden.float().cpu().numpy()],
            "alignment_score": alignment.float().cpu().numpy().astype(np.float64),
            "mlm_predictions": predictions,
            "mlm_scores": scores,
        }
    )


def input_example(vocab: JointVocab) -> pd.DataFrame:
    """Two sequences of different lengths: a masked text+video pair and a video-only one."""
    t, v = vocab.text_ids, vocab.video_ids
    joint = [2, t(0), MASK, t(1 % vocab.text_size), VIDEO_SEP, v(0), MASK, v(1 % vocab.num_visual), 3]
    video_only = [2, v(0), v(1 % vocab.num_visual), MASK, 3]
    return pd.DataFrame({"input_ids": [joint, video_only]})


def log_and_register_model(
    run_id: str,
    model: VideoBert,
    vocab: JointVocab,
    metadata: dict[str, Any],
    config: ExperimentConfig,
    registered_model: str,
    alias: str = CANDIDATE_ALIAS,
) -> str:
    """Log the pyfunc model into the run, register it and set `alias`; returns the version."""
    import mlflow
    from mlflow.models import infer_signature

    model = model.float().cpu().eval()
    example = input_example(vocab)
    signature = infer_signature(example, predict_frame(model, vocab, example))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / MODEL_FILES_DIR
        save_pretrained(model, vocab, model_dir)
        (model_dir / "metadata.json").write_text(json.dumps(metadata, indent=2))
        (model_dir / "experiment.yaml").write_text(config_to_yaml(config))
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=VideoBertPyfunc(),
                artifacts={"model": str(model_dir)},
                code_paths=[os.path.dirname(videobert.__file__)],
                signature=signature,
                input_example=example,
                pip_requirements=[
                    f"torch>={torch.__version__.split('+')[0]}",
                    "numpy",
                    "pandas",
                    "safetensors",
                    "pyyaml",
                ],
                registered_model_name=registered_model,
            )
    version = str(info.registered_model_version)
    mlflow.MlflowClient().set_registered_model_alias(registered_model, alias, version)
    return version


def load_registered_model(model_uri: str) -> tuple[VideoBert, JointVocab, dict[str, Any]]:
    """(model in eval mode on CPU, its vocabulary, metadata) from e.g. `models:/videobert@candidate`."""
    import mlflow.pyfunc

    python_model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    return python_model.model, python_model.vocab, python_model.metadata


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered model version (an alias resolved), with its shape, read without its weights."""

    name: str
    version: str
    requested: str
    """The URI asked for, e.g. models:/videobert@champion."""
    metadata: dict[str, Any]
    """metadata.json: codebook_uri / codebook_version, tokenizer, max_seq_len, ..."""
    config: VideoBertConfig
    num_visual: int
    """Visual words in the model's vocabulary (must equal its codebook's size)."""

    @property
    def uri(self) -> str:
        """The pinned URI: the same weights however the alias moves later."""
        return f"models:/{self.name}/{self.version}"


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """`models:/<name>@<alias>` -> (name, alias, None); `models:/<name>/<version>` -> (name, None, version)."""
    rest = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else ""
    name, at, alias = rest.partition("@")
    if at and name and alias and "/" not in alias:
        return name, alias, None
    name, slash, version = rest.rpartition("/")
    if not at and slash and name and version.isdigit():
        return name, None, version
    raise ConfigError(
        f"model URI must look like models:/<name>@<alias> or models:/<name>/<version>, got {model_uri!r}"
    )


def resolve_model_version(model_uri: str) -> ModelVersionInfo:
    """Resolve an alias or version in the current registry and read the version's small files.

    Raises ConfigError (naming the URI) when the model, alias or version does not exist.
    """
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(model_uri)
    client = mlflow.MlflowClient()
    try:
        if alias is not None:
            version = str(client.get_model_version_by_alias(name, alias).version)
        else:
            client.get_model_version(name, str(version))
    except MlflowException as error:
        raise ConfigError(
            f"{model_uri}: no such registered model version in {mlflow.get_registry_uri()} ({error.message}); "
            "run `videobert pretrain` (and `videobert promote` for @champion) or pick a version with "
            "--set embed.model_uri=models:/<name>/<version>"
        ) from error
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for file in ("metadata.json", "config.json", "vocab.json"):
            path = download_artifacts(
                artifact_uri=f"models:/{name}/{version}/artifacts/{MODEL_FILES_DIR}/{file}", dst_path=tmp
            )
            files[file] = json.loads(Path(path).read_text())
    return ModelVersionInfo(
        name=name,
        version=str(version),
        requested=model_uri,
        metadata=files["metadata.json"],
        config=VideoBertConfig(**files["config.json"]),
        num_visual=int(files["vocab.json"]["num_visual"]),
    )
