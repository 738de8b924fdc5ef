"""The MLflow model registry: the registered VideoBERT model, its versions and aliases.

- the model: an MLflow pyfunc whose artifacts are plain files written by us. `videobert/`:
  `model.safetensors` (consolidated fp32 weights), `config.json` (the model shape),
  `vocab.json` (the joint vocabulary), `metadata.json` (what it was trained on: codebook /
  tokenizer versions and URIs, tokens, encoder, decode settings) and `experiment.yaml` (the whole
  config). `inputs/` (videobert/model_inputs.py): the S3D encoder, codebook, text tokenizer
  and decode settings, so the version turns raw video into visual words by itself. No pickled
  tensors and no torch.export (which would fix the sequence length). `predict` takes raw video
  (a `video` column: local paths or s3:// URIs, optional `start_s` / `end_s`) through the same
  chain as `videobert embed` (videobert/embedding.py `VideoFileEmbedder`), or token sequences
  of any length up to max_positions (an `input_ids` column); the columns present choose.
  The python model class is pickled by reference, and the `videobert` package travels with the
  model as code (`code_paths`) so it loads where the package is not installed. That pyfunc is
  for external users; the pipeline itself (`load_registered_model`: evaluate, embed,
  train.resume_from_champion) rebuilds the model from the plain files and unpickles nothing.
- descriptions: every registered model and version gets a markdown model card
  (videobert/model_card.py): what it was trained on, its evaluation metrics once evaluated, and
  how to call predict.
- versions: `models:/<name>@<alias>` / `models:/<name>/<version>` URIs resolved to a version
  and its small files, without downloading the weights.
- aliases: pretrain points `candidate` at each new version; `champion` moves only when an
  evaluation says the candidate wins. Evaluation results live on the model version as tags
  `eval.<metric>` (see pipelines/evaluate.py), so a decision needs nothing but the registry.
  The decision and both scores are written back as tags on the candidate version, so the
  registry explains itself.

Where runs are tracked and the pretraining run itself: videobert/tracking.py.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import videobert
from videobert.config import ExperimentConfig, config_to_yaml, parse_model_uri, redact
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
from videobert.model_card import registered_model_card, version_card
from videobert.results import MissingInputError

if TYPE_CHECKING:
    from videobert.embedding import VideoFileEmbedder
    from videobert.model_inputs import ModelInputs
    from videobert.results import TokenizeResult

CHAMPION = "champion"
CANDIDATE = "candidate"
EVAL_RUN_TAG = "eval.run_id"  # on a version: the run that evaluated it
MISSING_METRIC_TAG = "evaluation.missing"  # on a version: why its evaluation lacks a metric
MODEL_FILES_DIR = "videobert"  # our plain files' folder among the logged pyfunc's artifacts
INPUT_FILES_DIR = "inputs"  # encoder, codebook, tokenizer, decode settings (videobert/model_inputs.py)
VIDEO_OUTPUT_COLUMNS = ("embedding", "cls_embedding", "visual_words", "num_clips", "error")


# -- the registered model ---------------------------------------------------------------------


class VideoBertPyfunc(mlflow.pyfunc.PythonModel):
    """`predict` takes one of two inputs, chosen by the DataFrame's columns:

    - raw video: `video` (a local path or s3:// URI per row), optionally `start_s` / `end_s` (a
      window in seconds; a clip belongs to it when its middle does). Output per row, in order:
      `embedding` and `cls_embedding` (what `videobert embed` computes), `visual_words`,
      `num_clips`, and `error`: a video that cannot be read (missing, not a video, over a
      `decode` bound) gets its reason there and null embeddings; the batch goes on.
    - token ids: `input_ids` (joint ids, a list per row) and optionally `token_type_ids` (else
      derived: video after `[>]` or for visual-word ids). Output per row: `embedding` (mean of
      the last hidden states), `cls_embedding`, `alignment_score` (probability that text and
      video are aligned), and at each `[MASK]`: `mlm_predictions` (joint ids) and `mlm_scores`.
    """

    def load_context(self, context: Any) -> None:
        from videobert.model_inputs import ModelInputs

        root = Path(context.artifacts["model"])
        self.model, self.vocab = load_pretrained(root)
        self.metadata = json.loads((root / "metadata.json").read_text())
        inputs = context.artifacts.get(INPUT_FILES_DIR)  # none in versions registered token-only
        self.inputs: ModelInputs | None = ModelInputs.load(inputs) if inputs else None
        self.video_embedder: VideoFileEmbedder | None = None  # built on the first video batch
        self.templates: dict[str, tuple[np.ndarray, list[int]]] = {}
        self.text_tokenizer: Any = None  # loaded on first use (`encode_text`)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        columns = set(model_input.columns)
        if "video" in columns and "input_ids" in columns:
            raise ValueError("give either a `video` column (raw video) or `input_ids` (token ids), not both")
        if "video" in columns:
            return predict_videos(self._video_embedder(), model_input)
        if "input_ids" in columns:
            return predict_frame(self.model, self.vocab, model_input)
        raise ValueError(
            f"expected a `video` column (local paths or s3:// URIs) or an `input_ids` column (token ids); "
            f"got {sorted(columns)}"
        )

    def _video_embedder(self) -> VideoFileEmbedder:
        if self.video_embedder is None:
            if self.inputs is None:
                raise ValueError("this model version carries no input files; it takes token ids only")
            from videobert.embedding import embedding_max_len

            max_len = embedding_max_len(self.model, self.metadata)
            self.video_embedder = self.inputs.video_embedder(self.model, self.vocab, max_len)
        return self.video_embedder

    def encode_text(self, text: str) -> list[int]:
        """Text -> WordPiece ids by the version's own tokenizer (loaded once)."""
        if self.text_tokenizer is None:
            from videobert.text_tokenizer import TextTokenizer

            if self.inputs is None or not self.inputs.tokenizer_uri:
                raise ValueError("this model version carries no tokenizer")
            self.text_tokenizer = TextTokenizer.load(self.inputs.tokenizer_uri)
        return self.text_tokenizer.encode(text)

    def template_ids(self, template: str) -> tuple[np.ndarray, list[int]]:
        """A text template's joint ids and [MASK] positions (`captioning.template_ids`), through
        the version's own tokenizer; computed once per template."""
        if template not in self.templates:
            from videobert.captioning import template_ids

            self.templates[template] = template_ids(template, self.encode_text, self.vocab)
        return self.templates[template]


def _seconds(value: Any) -> float | None:
    """A window bound from a DataFrame cell: None when missing (None, NaN, pd.NA)."""
    return None if value is None or pd.isna(value) else float(value)


def predict_videos(embedder: VideoFileEmbedder, frame: pd.DataFrame) -> pd.DataFrame:
    """The video interface: one output row per input row (see VideoBertPyfunc)."""
    videos, invalid = video_requests(frame)
    results = {r["video_id"]: r for r in embedder(videos)} if videos else {}
    rows = [results.get(str(row), {"error": invalid.get(str(row))}) for row in range(len(frame))]
    # Object columns: a missing value stays None (null in JSON), never pandas' NaN.
    columns = {name: pd.Series([r.get(name) for r in rows], dtype=object) for name in VIDEO_OUTPUT_COLUMNS}
    columns["num_clips"] = pd.Series([int(r.get("num_clips") or 0) for r in rows], dtype=np.int64)
    return pd.DataFrame(columns)


def video_requests(frame: pd.DataFrame) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """A `video` [+ start_s, end_s] frame -> the videos to decode (video_id: the row number as
    text) and row -> why for each row that names no valid video or window."""
    videos, invalid = [], {}
    for row, uri in enumerate(frame["video"].tolist()):
        start = _seconds(frame["start_s"].iloc[row]) if "start_s" in frame else None
        end = _seconds(frame["end_s"].iloc[row]) if "end_s" in frame else None
        if not isinstance(uri, str) or not uri.strip():
            invalid[str(row)] = f"video: expected a local path or s3:// URI, got {uri!r}"
        elif (start is not None and not 0 <= start < np.inf) or (
            end is not None and not end > (start or 0.0)
        ):
            invalid[str(row)] = f"window: need 0 <= start_s < end_s, got start_s={start}, end_s={end}"
        else:
            videos.append({"video_id": str(row), "source_uri": uri, "start_s": start, "end_s": end})
    return videos, invalid


def _token_types(ids: np.ndarray, vocab: JointVocab) -> np.ndarray:
    """Token types as the example builder sets them: video after `[>]`, all video when no text."""
    if (ids == VIDEO_SEP).any():
        return np.where(np.arange(len(ids)) > np.argmax(ids == VIDEO_SEP), VIDEO_TYPE, 0)
    has_text = ((ids >= vocab.text_offset) & ~vocab.is_video(ids)).any()
    return np.full(len(ids), 0 if has_text or not vocab.is_video(ids).any() else VIDEO_TYPE)


@torch.no_grad()
def predict_frame(model: VideoBert, vocab: JointVocab, frame: pd.DataFrame) -> pd.DataFrame:
    """Run the model on a DataFrame of variable-length sequences (one padded batch)."""
    if model.config.takes_features:
        raise ValueError(
            f"this model takes clip features (video_input {model.config.video_input!r}): give raw video "
            "(a `video` column), not input_ids"
        )
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


def video_input_example() -> pd.DataFrame:
    """The video interface's logged example: a window of one video and a whole one. Local paths,
    so MLflow's check of the example at logging reads no storage (each row becomes an error row)."""
    return pd.DataFrame(
        {
            "video": ["/data/videos/cooking.mp4", "/data/videos/other.mp4"],
            "start_s": [0.0, None],
            "end_s": [30.0, None],
        }
    )


def model_signature() -> Any:
    """One signature for both inputs (every column optional, so `mlflow models serve` accepts
    either form) and the union of both outputs."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    def optional(kind: Any, name: str) -> ColSpec:
        return ColSpec(kind, name, required=False)

    inputs = [optional("string", "video"), optional("double", "start_s"), optional("double", "end_s")]
    inputs += [optional(Array("long"), "input_ids"), optional(Array("long"), "token_type_ids")]
    outputs = [optional(Array("double"), "embedding"), optional(Array("double"), "cls_embedding")]
    outputs += [optional(Array("long"), "visual_words"), optional("long", "num_clips")]
    outputs += [optional("string", "error"), optional("double", "alignment_score")]
    outputs += [optional(Array("long"), "mlm_predictions"), optional(Array("double"), "mlm_scores")]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def log_and_register_model(
    run_id: str,
    model: VideoBert,
    vocab: JointVocab,
    metadata: dict[str, Any],
    config: ExperimentConfig,
    registered_model: str,
    alias: str = CANDIDATE,
) -> str:
    """Log the pyfunc model into the run, register it, set `alias` and describe the model and
    the version (model cards); returns the version.

    When `metadata` names a `codebook_uri`, the version also carries its input files
    (videobert/model_inputs.py: the config's encoder, that codebook, the `tokenizer_uri`
    tokenizer, the decode settings) and takes raw video; else it takes token ids only.
    """
    from videobert.model_inputs import write_model_inputs

    model = model.float().cpu().eval()
    metadata = {**metadata, "video_input": model.config.video_input}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, artifacts = Path(tmp) / MODEL_FILES_DIR, {}
        if metadata.get("codebook_uri"):
            inputs_dir = Path(tmp) / INPUT_FILES_DIR
            metadata["encoder"] = write_model_inputs(
                inputs_dir, config, metadata["codebook_uri"], metadata.get("tokenizer_uri")
            )
            metadata["decode"] = json.loads((inputs_dir / "decode.json").read_text())
            artifacts[INPUT_FILES_DIR] = str(inputs_dir)
        takes_video = metadata.get("encoder", {}).get("weights") in ("random", "file")
        save_pretrained(model, vocab, model_dir)
        (model_dir / "metadata.json").write_text(redact(json.dumps(metadata, indent=2)))
        (model_dir / "experiment.yaml").write_text(config_to_yaml(config))
        artifacts["model"] = str(model_dir)
        example = (
            video_input_example() if takes_video or model.config.takes_features else input_example(vocab)
        )
        version = log_pyfunc(
            run_id, VideoBertPyfunc(), artifacts, model_signature(), example, registered_model
        )
    client = MlflowClient()
    client.set_registered_model_alias(registered_model, alias, version)
    describe_version(client, registered_model, version, redact_metadata(metadata))
    return version


def log_pyfunc(
    run_id: str,
    python_model: mlflow.pyfunc.PythonModel,
    artifacts: dict[str, str],
    signature: Any,
    example: pd.DataFrame,
    registered_model: str,
) -> str:
    """Log a pyfunc over our plain-file `artifacts` into the run, with the `videobert` package as
    code, and register it under `registered_model`; returns the new version."""
    import torchvision

    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=python_model,
            artifacts=artifacts,
            code_paths=[os.path.dirname(videobert.__file__)],
            signature=signature,
            input_example=example,
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",  # rebuilds random S3D weights alike
                f"torchvision=={torchvision.__version__.split('+')[0]}",
                "numpy",
                "pandas",
                "pyarrow",
                "av",
                "safetensors",
                "tokenizers",
                "pyyaml",
            ],
            registered_model_name=registered_model,
        )
    return str(info.registered_model_version)


def redact_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """metadata as metadata.json holds it (URIs redacted)."""
    return json.loads(redact(json.dumps(metadata)))


def describe_version(
    client: MlflowClient,
    name: str,
    version: str,
    metadata: dict[str, Any] | None = None,
    card: Callable[..., str] = version_card,
    model_card: str | None = None,
) -> None:
    """Write the model cards (videobert/model_card.py) of `name` and of `version`: what it was
    trained on (its metadata.json, read when not given) and its `eval.*` tags. A card already
    up to date is not rewritten, so reruns write nothing. `card` and `model_card`: another
    registered model's (the classifiers')."""
    if metadata is None:
        metadata = resolve_model_version(f"models:/{name}/{version}").metadata
    current = client.get_model_version(name, version)
    tags = current.tags
    metrics = {
        key.removeprefix("eval."): float(value)
        for key, value in tags.items()
        if key.startswith("eval.") and key != EVAL_RUN_TAG
    }
    text = card(name, version, metadata, metrics, tags.get(EVAL_RUN_TAG))
    if current.description != text:
        client.update_model_version(name, version, description=text)
    model_card = model_card or registered_model_card(name)
    if client.get_registered_model(name).description != model_card:
        client.update_registered_model(name, description=model_card)


def load_registered_model(model_uri: str) -> tuple[VideoBert, JointVocab, dict[str, Any]]:
    """(model in eval mode on CPU, its vocabulary, metadata) from e.g. `models:/videobert@candidate`.

    Rebuilt from the version's plain files (safetensors and JSON), never by unpickling its
    pyfunc: a registry is shared, and loading a pickle from it would run whatever it holds.
    """
    from mlflow.artifacts import download_artifacts

    name, version = _version_of(model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        root = download_artifacts(artifact_uri=_files_uri(name, version), dst_path=tmp)
        model, vocab = load_pretrained(root)
        metadata = json.loads((Path(root) / "metadata.json").read_text())
    return model, vocab, metadata


def _files_uri(name: str, version: str, file: str = "") -> str:
    """Where a version's plain files (MODEL_FILES_DIR) are, or one of them."""
    return f"models:/{name}/{version}/artifacts/{MODEL_FILES_DIR}" + (f"/{file}" if file else "")


def _version_of(model_uri: str) -> tuple[str, str]:
    """(name, version) of `models:/<name>@<alias>` or `models:/<name>/<version>` in the current
    registry; MissingInputError (naming the URI) when it does not exist."""
    name, alias, version = parse_model_uri(model_uri)
    client = MlflowClient()
    try:
        if alias is not None:
            version = str(client.get_model_version_by_alias(name, alias).version)
        else:
            client.get_model_version(name, str(version))
    except MlflowException as error:
        raise MissingInputError(
            f"{model_uri}: no such registered model version in {redact(mlflow.get_registry_uri())} "
            f"({error.message}); run `videobert pretrain` (and `videobert promote` for @champion) or "
            "pick a version with --set embed.model_uri=models:/<name>/<version>"
        ) from error
    return name, str(version)


# -- versions ---------------------------------------------------------------------------------


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


def resolve_model_version(model_uri: str) -> ModelVersionInfo:
    """Resolve an alias or version in the current registry and read the version's small files.

    Raises MissingInputError (naming the URI) when the model, alias or version does not exist.
    """
    from mlflow.artifacts import download_artifacts

    name, version = _version_of(model_uri)
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for file in ("metadata.json", "config.json", "vocab.json"):
            path = download_artifacts(artifact_uri=_files_uri(name, version, file), dst_path=tmp)
            files[file] = json.loads(Path(path).read_text())
    return ModelVersionInfo(
        name=name,
        version=str(version),
        requested=model_uri,
        metadata=files["metadata.json"],
        config=VideoBertConfig(**files["config.json"]),
        num_visual=int(files["vocab.json"]["num_visual"]),
    )


def alias_version(client: MlflowClient, model_name: str, alias: str) -> str | None:
    """The version an alias points at, or None when the alias (or the model) does not exist."""
    try:
        return client.get_model_version_by_alias(model_name, alias).version
    except MlflowException:
        return None


# -- promotion --------------------------------------------------------------------------------


def eval_tag(metric: str) -> str:
    """The model-version tag holding an evaluation result, e.g. `eval.alignment_auc`."""
    return f"eval.{metric}"


def version_score(client: MlflowClient, model_name: str, version: str, metric: str) -> float | None:
    """The version's evaluated `metric`, or None when it was never evaluated."""
    tags = client.get_model_version(model_name, version).tags
    value = tags.get(eval_tag(metric))
    return None if value is None else float(value)


@dataclass(frozen=True)
class PromotionDecision:
    """What `promote` decided for one candidate version."""

    model_name: str
    version: str
    metric: str
    candidate_score: float | None
    """None when the version was never evaluated on `metric` (then nothing moves)."""
    champion_version: str | None
    champion_score: float | None
    promoted: bool
    reason: str


def not_evaluated_reason(client: MlflowClient, model_name: str, version: str, metric: str) -> str:
    """Why a version has no score on `metric`: never evaluated, or evaluated without it (the
    cause evaluate recorded in MISSING_METRIC_TAG, e.g. no labelled video could be scored)."""
    tags = client.get_model_version(model_name, version).tags
    if EVAL_RUN_TAG not in tags:
        return f"not evaluated: v{version} has no {eval_tag(metric)} tag (run `videobert evaluate`)"
    cause = tags.get(MISSING_METRIC_TAG) or "the evaluation recorded no such metric"
    return f"not evaluated: evaluation run {tags[EVAL_RUN_TAG]} gave no {eval_tag(metric)}: {cause}"


def promote(client: MlflowClient, model_name: str, version: str, metric: str) -> PromotionDecision:
    """Point `champion` at `version` if it beats the current champion on `metric` (higher wins).

    A first version becomes champion. A version without an evaluation on `metric` is recorded
    as "not evaluated" and moves nothing: a missing metric never stops a scheduled run. Ties
    keep the current champion, so reruns never flip-flop. Idempotent: promoting the champion
    again writes nothing.
    """
    recorded = client.get_model_version(model_name, version).tags
    candidate_score = version_score(client, model_name, version, metric)
    champion_version = alias_version(client, model_name, CHAMPION)
    champion_score = version_score(client, model_name, champion_version, metric) if champion_version else None
    if candidate_score is None:
        promoted, reason = False, not_evaluated_reason(client, model_name, version, metric)
    elif champion_version is None:
        promoted, reason = True, "no champion yet"
    elif champion_version == version:
        promoted, reason = True, "already champion"
    elif champion_score is None:
        promoted, reason = True, f"champion v{champion_version} has no {metric} score"
    elif candidate_score > champion_score:
        promoted, reason = True, f"{metric} {candidate_score:.4f} > champion's {champion_score:.4f}"
    else:
        promoted, reason = False, f"{metric} {candidate_score:.4f} <= champion's {champion_score:.4f}"
    if promoted and champion_version != version:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    decision = PromotionDecision(
        model_name, version, metric, candidate_score, champion_version, champion_score, promoted, reason
    )
    # The champion promoted again: its recorded promotion stands, and a rerun writes nothing.
    standing = champion_version == version and recorded.get("promotion.decision") == "promoted"
    for key, value in {
        "promotion.decision": "promoted"
        if promoted
        else "rejected"
        if candidate_score is not None
        else "not evaluated",
        "promotion.reason": reason,
        "promotion.metric": metric,
        "promotion.candidate_score": "" if candidate_score is None else f"{candidate_score:.6f}",
        "promotion.champion_version": champion_version or "",
        "promotion.champion_score": "" if champion_score is None else f"{champion_score:.6f}",
    }.items():
        if recorded.get(key) != value and not standing:
            client.set_model_version_tag(model_name, version, key, value)
    return decision


# -- pretraining's use of the registry --------------------------------------------------------

TRAINED_ON_TAGS = ("tokens_digest", "train_digest")
"""Version tags that say what a version was trained on (see videobert.results)."""


def version_tags(client: MlflowClient, model_name: str, alias: str) -> dict[str, str]:
    """The tags of the version an alias points at, plus its `version`; {} without one."""
    version = alias_version(client, model_name, alias)
    if version is None:
        return {}
    return {"version": version, **client.get_model_version(model_name, version).tags}


def champion_to_continue_from(config: ExperimentConfig) -> str | None:
    """The pinned champion URI when `train.resume_from_champion` is set and a champion exists."""
    if not config.train.resume_from_champion:
        return None
    name = config.mlflow.registered_model
    version = alias_version(MlflowClient(), name, CHAMPION)
    return None if version is None else f"models:/{name}/{version}"


def init_from_registered(
    model: VideoBert, vocab: JointVocab, model_uri: str, codebook_version: str
) -> dict[str, int]:
    """Copy a registered version's weights into a fresh model (train.resume_from_champion):
    text rows follow their tokens; visual-word rows only under the same codebook."""
    from videobert.model import init_from_videobert

    source, source_vocab, meta = load_registered_model(model_uri)
    same_codebook = meta.get("codebook_version") == codebook_version
    return init_from_videobert(model, vocab, source, source_vocab, same_codebook)


def record_evaluation(
    name: str, version: str, metrics: dict[str, float], plots: dict[str, Path], meta: dict[str, Any]
) -> str:
    """An evaluation run linked to the model version (metrics, report, plots), and the metrics
    as `eval.<metric>` tags on the version, which `promote` compares; returns the run id."""
    from videobert import reports

    client = MlflowClient()
    with mlflow.start_run(run_name=f"evaluate-{name}-v{version}") as active:
        mlflow.set_tags({"stage": "evaluate", "model_name": name, "model_version": version})
        model_id = client.get_model_version(name, version).model_id
        mlflow.log_metrics(metrics, model_id=model_id) if model_id else mlflow.log_metrics(metrics)
        notes = {
            "model": f"models:/{name}/{version}",
            "codebook": meta["codebook_version"],
            "tokenizer": meta["tokenizer_version"],
        }
        report = reports.markdown_report(
            f"Evaluation of {name} v{version}",
            metrics,
            notes=notes,
            plots={path.removesuffix(".png").replace("_", " "): path for path in plots},
        )
        mlflow.log_text(report, "evaluation/report.md")
        for path in plots.values():
            mlflow.log_artifact(str(path), "evaluation")
    for key, value in metrics.items():
        client.set_model_version_tag(name, version, eval_tag(key), f"{value:.6f}")
    client.set_model_version_tag(name, version, EVAL_RUN_TAG, active.info.run_id)
    describe_version(client, name, version)  # the version's card now shows these metrics
    return active.info.run_id


def register_pretrained(
    run_id: str,
    model: VideoBert,
    vocab: JointVocab,
    config: ExperimentConfig,
    tokens: TokenizeResult,
    trained: dict[str, Any],
) -> str:
    """Register a pretrained model as `candidate`, with the metadata that makes it
    self-describing (codebook, tokenizer, tokens, run) and tags saying what it was trained on
    (TRAINED_ON_TAGS); returns the version. `trained`: run_name, steps, checkpoint, init_from
    and the TRAINED_ON_TAGS values."""
    metadata = {
        "codebook_version": tokens.codebook.version,
        "tokenizer_version": tokens.tokenizer.version,
        "codebook_uri": tokens.codebook.uri,
        "tokenizer_uri": tokens.tokenizer.uri,
        "tokens_uri": tokens.tokens_uri,
        "tokens_digest": tokens.digest,
        "tokenized_videos": len(tokens.files),  # one token file per video
        "holdout_fraction": config.evaluate.holdout_fraction,
        "model_size": config.model.size,
        "max_seq_len": config.model.max_seq_len,
        **{k: trained[k] for k in ("steps", "run_name", "checkpoint", "init_from")},
    }
    name = config.mlflow.registered_model
    version = log_and_register_model(run_id, model, vocab, metadata, config, name)
    client = MlflowClient()
    for tag in TRAINED_ON_TAGS:
        client.set_model_version_tag(name, version, tag, trained[tag])
    client.set_model_version_tag(name, version, "video_input", model.config.video_input)
    return version


def already_trained(
    config: ExperimentConfig, trained_on: dict[str, str], model_name: str | None = None
) -> str | None:
    """The candidate version of `model_name` (default mlflow.registered_model) when its tags say
    it was trained on exactly `trained_on` (pretrain's: TRAINED_ON_TAGS)."""
    tags = version_tags(MlflowClient(), model_name or config.mlflow.registered_model, CANDIDATE)
    return tags["version"] if tags and all(tags.get(t) == v for t, v in trained_on.items()) else None
