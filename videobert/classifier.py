"""The registered classifier: a pretrained VideoBERT version plus a trained head, as its own
MLflow registered model (`finetune.classifier_name`, default `videobert-classifier`).

A version's artifacts are plain files (safetensors and JSON; nothing pickled but the pyfunc
class, by reference):

    videobert/    the pretrained version's files (videobert/registry.py); in `full` mode
                  model.safetensors holds the fine-tuned encoder. metadata.json is the
                  pretrained version's, plus `classifier` (what is below, and the lineage)
    inputs/       the pretrained version's input files, copied (encoder, codebook, tokenizer,
                  decode and s3 settings: videobert/model_inputs.py)
    classifier/   head.safetensors (`linear.weight`, `linear.bias`, `mean`, `std`) and
                  classes.json (the classes in the order of the head's outputs and of `scores`,
                  and the `template` whose [MASK] outputs the head takes, or null)

`predict` takes a DataFrame with a `video` column (local paths or s3:// URIs) and optional
`start_s` / `end_s`, and returns per row `label`, `scores` (a probability per class, in the
order of classes.json) and `error`: the pretrained pyfunc's video chain (`predict_videos`:
decode, S3D, codebook, `[CLS] video [SEP]` pooled), with the template's [MASK] outputs for a
head trained on them (classes.json's `template`; `classification.head_inputs`), then the head.
A video that cannot be read gets its reason in `error` and no label; the batch goes on.

Aliases: `candidate` on each new version; `champion` moved by `registry.promote` on
`eval.test_top1` (strictly higher wins). The version's `pretrained_model` tag names the
pretrained version it was built on; `labels_digest` and `finetune_digest` say what it was
trained on, so a rerun over the same inputs trains nothing (`registry.already_trained`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from videobert.classification import ClassifierHead
from videobert.config import ConfigError, ExperimentConfig, config_to_yaml, redact
from videobert.registry import (
    INPUT_FILES_DIR,
    MODEL_FILES_DIR,
    VideoBertPyfunc,
    log_pyfunc,
    predict_videos,
    video_input_example,
)

if TYPE_CHECKING:
    from videobert.registry import ModelVersionInfo

CLASSIFIER_FILES_DIR = "classifier"
HEAD_FILE = "head.safetensors"
CLASSES_FILE = "classes.json"
OUTPUT_COLUMNS = ("label", "scores", "error")
LINEAGE_TAG = "pretrained_model"
"""On a classifier version: the pinned pretrained version it was built on, models:/<name>/<version>."""


def save_head(
    head: dict[str, torch.Tensor], classes: list[str], info: dict[str, Any], directory: Path
) -> None:
    """classifier/: head.safetensors and classes.json (classes plus `info`)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in head.items()}, str(directory / HEAD_FILE))
    (directory / CLASSES_FILE).write_text(redact(json.dumps({"classes": classes, **info}, indent=2)))


def load_head(directory: str | Path) -> tuple[ClassifierHead, list[str], str | None]:
    """The head (eval mode, CPU), its classes and the template whose [MASK] outputs it takes
    (None: the pooled embedding alone, as every version before `template_features`), from
    classifier/."""
    from safetensors.torch import load_file

    directory = Path(directory)
    state = load_file(str(directory / HEAD_FILE))
    info = json.loads((directory / CLASSES_FILE).read_text())
    classes = list(info["classes"])
    hidden = state["linear.weight"].shape[1]
    head = ClassifierHead(hidden, len(classes))
    head.load_state_dict(state)
    return head.eval(), classes, info.get("template")


@torch.no_grad()
def classify_rows(
    head: ClassifierHead,
    classes: list[str],
    embedded: pd.DataFrame,
    extra: dict[int, torch.Tensor] | None = None,
) -> pd.DataFrame:
    """`predict_videos`' rows -> label, scores and error per row (no label where no embedding).
    `extra`: row -> the template features that follow the embedding in the head's input."""
    good = [i for i, e in enumerate(embedded["embedding"]) if e is not None]
    labels: list[str | None] = [None] * len(embedded)
    scores: list[list[float] | None] = [None] * len(embedded)
    if good:
        device = head.linear.weight.device
        inputs = torch.as_tensor(np.stack([embedded["embedding"][i] for i in good]), device=device).float()
        if extra is not None:
            inputs = torch.cat([inputs, torch.stack([extra[i] for i in good]).to(device)], -1)
        probabilities = torch.softmax(head(inputs), -1).double().cpu().numpy()
        for row, p in zip(good, probabilities, strict=True):
            labels[row], scores[row] = classes[int(p.argmax())], p.tolist()
    return pd.DataFrame(
        {
            "label": pd.Series(labels, dtype=object),
            "scores": pd.Series(scores, dtype=object),
            "error": pd.Series(list(embedded["error"]), dtype=object),
        }
    )


class VideoClassifierPyfunc(VideoBertPyfunc):
    """`predict(DataFrame with video[, start_s, end_s])` -> label, scores, error (module doc)."""

    def load_context(self, context: Any) -> None:
        super().load_context(context)
        self.head, self.classes, self.head_template = load_head(context.artifacts[CLASSIFIER_FILES_DIR])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if "video" not in model_input.columns:
            raise ValueError(
                f"expected a `video` column (local paths or s3:// URIs), optionally start_s / end_s; "
                f"got {sorted(model_input.columns)}"
            )
        embedded = predict_videos(self._video_embedder(), model_input)
        return classify_rows(self.head, self.classes, embedded, self._template_features(embedded))

    @torch.no_grad()
    def _template_features(self, embedded: pd.DataFrame) -> dict[int, torch.Tensor] | None:
        """Row -> the template's mean [MASK] output with the row's visual words, as training
        computed it (`classification.template_outputs`); None for a head without a template."""
        if self.head_template is None:
            return None
        from videobert.classification import template_outputs
        from videobert.embedding import embedding_max_len

        rows = [i for i, e in enumerate(embedded["embedding"]) if e is not None]
        if not rows:
            return {}
        template = self.template_ids(self.head_template)
        words = [np.asarray(embedded["visual_words"][i], np.int64) for i in rows]
        max_len = embedding_max_len(self.model, self.metadata)
        masked = template_outputs(self.model.eval(), self.vocab, template, words, max_len)
        return dict(zip(rows, masked.cpu(), strict=True))


def classifier_signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = [ColSpec("string", "video")]
    inputs += [ColSpec("double", "start_s", required=False), ColSpec("double", "end_s", required=False)]
    outputs = [ColSpec("string", "label", required=False), ColSpec(Array("double"), "scores", required=False)]
    outputs += [ColSpec("string", "error", required=False)]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def check_takes_video(pretrained: ModelVersionInfo) -> None:
    """ConfigError unless the pretrained version carries a clip encoder (its `inputs/`): without
    one, a classifier built on it could not take raw video."""
    encoder = pretrained.metadata.get("encoder") or {}
    if encoder.get("weights") not in ("random", "file"):
        reason = encoder.get("reason") or "registered without input files"
        raise ConfigError(
            f"finetune.model_uri {pretrained.uri}: the version carries no clip encoder ({reason}), so a "
            "classifier built on it could not take raw video; pick a version registered by pretrain"
        )


def pretrained_files(pretrained: ModelVersionInfo, directory: Path) -> tuple[Path, Path]:
    """The pretrained version's videobert/ and inputs/ artifacts, downloaded under `directory`."""
    from mlflow.artifacts import download_artifacts

    check_takes_video(pretrained)
    base = f"models:/{pretrained.name}/{pretrained.version}/artifacts"
    files = [
        Path(download_artifacts(artifact_uri=f"{base}/{folder}", dst_path=str(directory)))
        for folder in (MODEL_FILES_DIR, INPUT_FILES_DIR)
    ]
    return files[0], files[1]


def register_classifier(
    run_id: str,
    config: ExperimentConfig,
    pretrained: ModelVersionInfo,
    head: dict[str, torch.Tensor],
    encoder: dict[str, torch.Tensor] | None,
    classes: list[str],
    info: dict[str, Any],
    tags: dict[str, str],
) -> str:
    """Log and register a classifier version (module doc) as `candidate`, with `tags` (lineage
    and what it was trained on) and `info` in its metadata.json and classes.json; returns it."""
    name = config.finetune.classifier_name
    with tempfile.TemporaryDirectory() as tmp:
        metadata = {**pretrained.metadata, "classifier": {"classes": classes, **info}}
        artifacts = fine_tuned_files(config, pretrained, encoder, metadata, Path(tmp))
        save_head(head, classes, info, Path(tmp) / CLASSIFIER_FILES_DIR)
        artifacts[CLASSIFIER_FILES_DIR] = str(Path(tmp) / CLASSIFIER_FILES_DIR)
        version = log_pyfunc(
            run_id, VideoClassifierPyfunc(), artifacts, classifier_signature(), video_input_example(), name
        )
    tag_candidate(name, version, tags)
    return version


def fine_tuned_files(
    config: ExperimentConfig,
    pretrained: ModelVersionInfo,
    encoder: dict[str, torch.Tensor] | None,
    metadata: dict[str, Any],
    directory: Path,
) -> dict[str, str]:
    """A fine-tuned model's `model` and `inputs/` artifacts under `directory`: the pretrained
    version's files (with `encoder`'s weights when fine-tuned, else its own), `metadata` as
    metadata.json, and the config as experiment.yaml. Returns the pyfunc's artifacts map."""
    from videobert.model import load_pretrained, load_weights, save_pretrained

    model_dir, inputs_dir = pretrained_files(pretrained, directory / "pretrained")
    files = directory / "fine-tuned"
    shutil.copytree(model_dir, files / MODEL_FILES_DIR)
    if encoder is not None:  # the fine-tuned encoder replaces the pretrained weights
        model, vocab = load_pretrained(model_dir)
        load_weights(model, encoder)
        save_pretrained(model, vocab, files / MODEL_FILES_DIR)
    (files / MODEL_FILES_DIR / "metadata.json").write_text(redact(json.dumps(metadata, indent=2)))
    (files / MODEL_FILES_DIR / "experiment.yaml").write_text(config_to_yaml(config))
    return {"model": str(files / MODEL_FILES_DIR), INPUT_FILES_DIR: str(inputs_dir)}


def tag_candidate(name: str, version: str, tags: dict[str, str]) -> None:
    """Point `candidate` at a new version of `name` and tag it (lineage, what it was trained on)."""
    from mlflow import MlflowClient

    from videobert.registry import CANDIDATE

    client = MlflowClient()
    client.set_registered_model_alias(name, CANDIDATE, version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, redact(value))
