"""What the fine-tuned models say about a few held-out videos, next to the truth: the end of
`./scripts/demo.sh` (`videobert show`).

The videos are the first `demo.show_videos` test rows of the classification table
(`finetune.labels`), else of the captions table (`finetune.captions`). Each is run through the
registered champions as a user would run them, `mlflow.pyfunc.load_model(...).predict` on a
`video` column: the classifier on the table's row (its window, if any), the captioner on the
video's first test caption row (its window). A model that is not registered yet, or a table
that is not set, leaves its columns out; a video that cannot be read shows its error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from videobert.config import ExperimentConfig


@dataclass
class ShownVideo:
    """One held-out video: its window and what is known and predicted about it."""

    video: str
    start_s: float | None = None
    end_s: float | None = None
    true_label: str | None = None
    predicted_label: str | None = None
    true_caption: str | None = None
    caption_start_s: float | None = None
    caption_end_s: float | None = None
    generated_caption: str | None = None
    error: str | None = None


def _number(value: Any) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return None
    return float(value)


def _test_caption_rows(config: ExperimentConfig) -> list[dict[str, Any]]:
    """The captions table's test rows (its `split` column, else the same hash hold-out as the
    classification table's), in table order."""
    from videobert.classification import TEST, holdout_split
    from videobert.evaluation import listed_uri, read_labels

    uri = config.finetune.captions
    if not uri:
        return []
    table = read_labels(uri, config, ("source_uri", "caption"), "finetune.captions").to_pylist()
    rows = []
    for row in table:
        split = str(row.get("split") or "").strip().lower()
        if not split:
            split = holdout_split(str(row["source_uri"]), config.finetune.test_fraction, config.source)
        if split == TEST:
            rows.append({**row, "source_uri": listed_uri(str(row["source_uri"]))})
    return rows


def held_out_videos(config: ExperimentConfig, count: int) -> list[ShownVideo]:
    """Up to `count` held-out videos with their true label and caption (module doc)."""
    from videobert.classification import TEST, read_classification_table

    captions: dict[str, dict[str, Any]] = {}
    for row in _test_caption_rows(config):
        captions.setdefault(row["source_uri"], row)
    shown: list[ShownVideo] = []
    if config.finetune.labels:
        for clip in read_classification_table(config.finetune.labels, config):
            if clip.split == TEST and all(s.video != clip.source_uri for s in shown):
                shown.append(ShownVideo(clip.source_uri, clip.start_s, clip.end_s, true_label=clip.label))
    else:
        shown = [ShownVideo(uri) for uri in captions]
    shown = shown[:count]
    for video in shown:
        row = captions.get(video.video)
        if row is not None:
            video.true_caption = str(row["caption"])
            video.caption_start_s, video.caption_end_s = (
                _number(row.get("start_s")),
                _number(row.get("end_s")),
            )
    return shown


def champion_model(model_name: str) -> Any | None:
    """`models:/<model_name>@champion` as a pyfunc, or None when there is none yet."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from videobert.registry import CHAMPION

    try:
        MlflowClient().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None
    return mlflow.pyfunc.load_model(f"models:/{model_name}@{CHAMPION}")


def _predict(model: Any, windows: list[tuple[str, float | None, float | None]]) -> pd.DataFrame:
    """`model.predict` on (video, start_s, end_s) rows, as a user calls a registered model."""
    frame = pd.DataFrame(windows, columns=["video", "start_s", "end_s"])
    # No window is NaN, as the logged signature's optional double columns expect.
    return model.predict(frame.astype({"start_s": "float64", "end_s": "float64"}))


def predict_shown(config: ExperimentConfig, shown: list[ShownVideo]) -> list[ShownVideo]:
    """Fill in each video's predicted label and generated caption from the registered champions."""
    classifier = champion_model(config.finetune.classifier_name) if config.finetune.labels else None
    if classifier is not None and shown:
        out = _predict(classifier, [(s.video, s.start_s, s.end_s) for s in shown])
        for video, label, error in zip(shown, out["label"], out["error"], strict=True):
            video.predicted_label, video.error = label, error or video.error
    captioner = champion_model(config.finetune.captioner_name) if config.finetune.captions else None
    with_caption = [s for s in shown if s.true_caption is not None]
    if captioner is not None and with_caption:
        out = _predict(captioner, [(s.video, s.caption_start_s, s.caption_end_s) for s in with_caption])
        for video, caption, error in zip(with_caption, out["caption"], out["error"], strict=True):
            video.generated_caption, video.error = caption, error or video.error
    return shown


def format_shown(shown: list[ShownVideo]) -> str:
    """Plain text, a block per video: the predicted label (right or wrong) and the generated
    caption, each with its truth."""
    if not shown:
        return "no held-out video to show (set finetune.labels or finetune.captions)"
    lines = []
    for video in shown:
        lines.append(video.video.rsplit("/", 1)[-1])
        if video.true_label is not None:
            verdict = "right" if video.predicted_label == video.true_label else "wrong"
            lines.append(f"  label:      {video.predicted_label}  ({verdict}; truth: {video.true_label})")
        if video.true_caption is not None:
            lines.append(f"  caption:    {video.generated_caption}")
            lines.append(f"  its truth:  {video.true_caption}")
        if video.error:
            lines.append(f"  error:      {video.error}")
    return "\n".join(lines)
