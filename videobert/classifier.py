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
                  whether the head takes the `pooled` embedding (absent: true), and the
                  `template` whose [MASK] outputs it takes, or null)

`predict` takes a DataFrame with a `video` column (local paths or s3:// URIs) and optional
`start_s` / `end_s`, and returns per row `label`, `scores` (a probability per class, in the
order of classes.json) and `error`: the pretrained pyfunc's video chain (`predict_videos`:
decode, S3D, codebook, `[CLS] video [SEP]` pooled), the template's [MASK] outputs for a head
trained on them (classes.json's `template`), each part the head takes in the order of
`classification.head_inputs`, then the head.
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
from dataclasses import dataclass
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


@dataclass
class LoadedHead:
    """A registered classifier's head and what its input is made of (module doc)."""

    head: ClassifierHead
    classes: list[str]
    pooled: bool
    """It takes the pooled embedding (every version before `pooled_features`)."""
    template: str | None
    """The template whose [MASK] outputs it takes; None: none (versions before `template_features`)."""
    zero_shot: dict[str, Any] | None = None
    """`weight`, `prefix` and `pairs` of the zero-shot scores its own blend with (classes.json's
    `zero_shot`, `finetune.zero_shot_weight`); None: the head alone."""


def load_head(directory: str | Path) -> LoadedHead:
    """The head (eval mode, CPU) and its input's recipe, from classifier/."""
    from safetensors.torch import load_file

    directory = Path(directory)
    state = load_file(str(directory / HEAD_FILE))
    info = json.loads((directory / CLASSES_FILE).read_text())
    classes = list(info["classes"])
    hidden = state["linear.weight"].shape[1]
    head = ClassifierHead(hidden, len(classes))
    head.load_state_dict(state)
    pooled = bool(info.get("pooled", True))
    return LoadedHead(head.eval(), classes, pooled, info.get("template"), info.get("zero_shot"))


@torch.no_grad()
def classify_rows(
    loaded: LoadedHead,
    embedded: pd.DataFrame,
    template: dict[int, torch.Tensor] | None = None,
    zero_shot: dict[int, np.ndarray] | None = None,
) -> pd.DataFrame:
    """`predict_videos`' rows -> label, scores and error per row (no label where no embedding).
    `template`: row -> the template's [MASK] features, which follow the pooled embedding (when
    the head takes it) in the head's input; `zero_shot`: row -> the zero-shot class scores the
    head's blend with (`classification.blend_with_zero_shot`)."""
    from videobert.classification import blend_with_zero_shot

    good = [i for i, e in enumerate(embedded["embedding"]) if e is not None]
    labels: list[str | None] = [None] * len(embedded)
    scores: list[list[float] | None] = [None] * len(embedded)
    if good:
        device = loaded.head.linear.weight.device
        parts = []
        if loaded.pooled:
            parts.append(torch.as_tensor(np.stack([embedded["embedding"][i] for i in good]), device=device))
        if template is not None:
            parts.append(torch.stack([template[i] for i in good]).to(device))
        logits = loaded.head(torch.cat(parts, -1).float())
        weight, prior = 0.0, torch.zeros_like(logits)
        if zero_shot is not None and loaded.zero_shot:
            weight = float(loaded.zero_shot["weight"])
            prior = torch.as_tensor(np.stack([zero_shot[i] for i in good]))
        probabilities = blend_with_zero_shot(logits, prior, weight).double().cpu().numpy()
        for row, p in zip(good, probabilities, strict=True):
            labels[row], scores[row] = loaded.classes[int(p.argmax())], p.tolist()
    return pd.DataFrame(
        {
            "label": pd.Series(labels, dtype=object),
            "scores": pd.Series(scores, dtype=object),
            "error": pd.Series(list(embedded["error"]), dtype=object),
        }
    )


def readable_rows(embedded: pd.DataFrame) -> tuple[list[int], list[np.ndarray]]:
    """`predict_videos`' rows that have an embedding, and their visual words."""
    rows = [i for i, e in enumerate(embedded["embedding"]) if e is not None]
    return rows, [np.asarray(embedded["visual_words"][i], np.int64) for i in rows]


class VideoClassifierPyfunc(VideoBertPyfunc):
    """`predict(DataFrame with video[, start_s, end_s])` -> label, scores, error (module doc)."""

    def load_context(self, context: Any) -> None:
        super().load_context(context)
        self.loaded = load_head(context.artifacts[CLASSIFIER_FILES_DIR])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if "video" not in model_input.columns:
            raise ValueError(
                f"expected a `video` column (local paths or s3:// URIs), optionally start_s / end_s; "
                f"got {sorted(model_input.columns)}"
            )
        embedded = predict_videos(self._video_embedder(), model_input)
        return classify_rows(
            self.loaded, embedded, self._template_features(embedded), self._zero_shot_scores(embedded)
        )

    @torch.no_grad()
    def _template_features(self, embedded: pd.DataFrame) -> dict[int, torch.Tensor] | None:
        """Row -> the template's mean [MASK] output with the row's visual words, as training
        computed it (`classification.template_outputs`); None for a head without a template."""
        if self.loaded.template is None:
            return None
        from videobert.classification import template_outputs
        from videobert.embedding import embedding_max_len

        rows, words = readable_rows(embedded)
        if not rows:
            return {}
        template = self.template_ids(self.loaded.template)
        max_len = embedding_max_len(self.model, self.metadata)
        masked = template_outputs(self.model.eval(), self.vocab, template, words, max_len)
        return dict(zip(rows, masked.cpu(), strict=True))

    def _zero_shot_scores(self, embedded: pd.DataFrame) -> dict[int, np.ndarray] | None:
        """Row -> the pretrained model's zero-shot class scores with the row's visual words, as
        training computed them (`classification.class_log_scores`); None for a head alone."""
        if not self.loaded.zero_shot:
            return None
        from videobert.classification import class_log_scores, zero_shot_words
        from videobert.evaluation import template_word_scores

        rows, words = readable_rows(embedded)
        if not rows:
            return {}
        settings = self.loaded.zero_shot
        pairs = (
            {label: tuple(pair) for label, pair in settings["pairs"].items()} if settings["pairs"] else None
        )
        verbs, objects = zero_shot_words(self.loaded.classes, pairs)
        videos = [(f"row {i}", w, None) for i, w in zip(rows, words, strict=True)]
        max_len = int(self.metadata.get("max_seq_len", self.model.config.max_positions))
        scores = template_word_scores(
            self.model.eval(),
            self.vocab,
            self.encode_text,
            videos,
            verbs,
            objects,
            max_len,
            settings["prefix"],
        )
        return dict(zip(rows, class_log_scores(*scores, self.loaded.classes, pairs), strict=True))


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
