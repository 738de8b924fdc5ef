"""Classification fine-tuning (Ray-free): a labelled table of videos -> a linear head on a
pretrained VideoBERT's video features, trained and scored on the table's test split.

- **The table** (`read_classification_table`, `finetune.labels`): CSV or Parquet with
  `source_uri` and `label`; optionally `start_s` / `end_s` (a window in seconds: the clips whose
  middle lies in it), `split` (`train` or `test`) and `verb` / `object`. Any other column is
  ignored. A bad table is a ConfigError naming the column (and the row).
- **The split** (`holdout_split`): the `split` column when there is one; else a hold-out by
  video hash (`evaluation.in_holdout`, `finetune.test_fraction`), so every window of a video
  lands on the same side and a rerun splits alike.
- **The head's input** (`head_inputs`): with `finetune.pooled_features` (default), the
  pretrained encoder over the clip's visual words as `[CLS] video [SEP]`, pooled as the mean of
  the video tokens' last hidden states (`embedding.pooled_embeddings`, what `videobert embed`
  stores as `embedding`: it takes videos longer than one sequence, in chunks); and with
  `finetune.template_features` (default), after it the mean of the `[MASK]` outputs of the
  zero-shot template with the clip (template [>] video, `captioning.segment_parts`, video cut
  to fit one sequence), as the paper feeds its downstream models (§4.6). The pooled embedding
  alone lost to the template itself once the demo model named verbs (0.83-0.92 against
  zero-shot 1.00 on one champion); no input alone kept the head at zero-shot's accuracy on
  every demo champion (README), hence the blend below. The
  template part is generic hidden states, so any label set works, not only "<verb> the
  <object>"; the registered classifier's `predict` computes the same parts from the raw video.
- **Visual words** (`clip_words`): extract's features of the clip's video (the labelled set's
  own tables, `evaluation.evalset_root`) through the pretrained model's codebook, clip order,
  clips inside the window: the words the pyfunc computes from the raw video (`ClipWords`
  assigns the same float16 features). Not tokenize's segments: a clip on a sentence boundary
  is in two of them, and a window needs single clips.
- **Training** (`train_classifier`, one process: pipelines/finetune_classify.py runs it as one
  Ray task): `linear_probe` embeds every training clip once with the frozen encoder and
  trains the head on those vectors; `full` trains the encoder (`finetune.encoder_lr`) and the
  head (`finetune.lr`) through `head_inputs`. The head standardises its input with the
  training embeddings' mean and deviation (fixed) before one linear layer.
- **Blended with zero-shot** (`blend_with_zero_shot`, `finetune.zero_shot_weight` w): the
  classifier's scores are softmax((1 - w) log p_head + w log p_zero-shot), with zero-shot's
  class scores below; the registered model's `predict` blends the same way. Only for classes
  that are (verb, object) pairs (`blend_weight`): a table of labels alone gets the head alone. On the demo the
  head alone fitted some champions' training clips in ways that missed held-out ones, which
  zero-shot named (README).
- **Zero-shot next to it** (`zero_shot_class_scores`): the same pretrained model, before any
  fine-tuning, on the same test clips, with the template its own evaluation asked in
  ("<prefix> [MASK] the [MASK]", `evaluation.zero_shot`; the prefix is the version's
  `evaluation.PREFIX_TAG`, the corpus's own words, else the paper's "now let me show you how
  to"); the head's template part uses the same words. With `verb` and `object` columns a class scores
  log p(its verb at the first [MASK]) + log p(its object at the second), each softmax over the
  table's verbs / objects. With `label` alone, a class scores the logit of its label's first
  WordPiece at the object [MASK] (one-word labels such as objects; a longer label is judged by
  its first word only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from videobert import storage
from videobert.config import ConfigError, ExperimentConfig, FinetuneConfig, S3Config
from videobert.evaluation import (
    ZERO_SHOT_PREFIX,
    ZeroShotItem,
    evalset_root,
    holdout_key,
    in_holdout,
    listed_uri,
    read_labels,
    zero_shot,
    zero_shot_template,
)
from videobert.metrics import confusion_matrix, top_k_accuracy
from videobert.tables import Layout, read_manifest, video_id
from videobert.videos import in_window, rows_by_video

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
TRAIN, TEST = SPLITS
REQUIRED_COLUMNS = ("source_uri", "label")
METRIC = "test_top1"
"""What the classifiers' `champion` alias is moved on (higher wins)."""


# ---- the labels table -----------------------------------------------------------------------


class VideoWindow:
    """A table row naming a video (`source_uri`) and maybe a window of it (`start_s`, `end_s`):
    what `clip_words` reads. Mixed into the fine-tuning tables' row classes."""

    row: int
    source_uri: str
    start_s: float | None
    end_s: float | None

    @property
    def video_id(self) -> str:
        return video_id(self.source_uri)

    @property
    def name(self) -> str:
        """The video, with its window when it has one."""
        if self.start_s is None and self.end_s is None:
            return self.source_uri
        return f"{self.source_uri} [{self.start_s or 0:g}, {'end' if self.end_s is None else f'{self.end_s:g}'}) s"


@dataclass(frozen=True)
class LabelledClip(VideoWindow):
    """One row of the labels table: a video (or a window of it), its class and its split."""

    row: int
    """1-based data row of the table, for messages."""
    source_uri: str
    """As `storage.list_objects` spells it (`evaluation.listed_uri`)."""
    label: str
    split: str
    start_s: float | None = None
    end_s: float | None = None
    verb: str | None = None
    object: str | None = None


def holdout_split(source_uri: str, test_fraction: float, source: str) -> str:
    """`test` for a deterministic `test_fraction` of videos (by the hash of the video's path
    under the corpus root `source`: `evaluation.holdout_key`), else `train`: every window of a
    video on one side, the same side on every run and wherever the corpus lives."""
    return (
        TEST if in_holdout(holdout_key(listed_uri(source_uri), listed_uri(source)), test_fraction) else TRAIN
    )


def _text(value: Any) -> str | None:
    """A cell as text; None for a missing one (null, NaN, blank)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _seconds(value: Any, column: str, row: int, where: str) -> float | None:
    if _text(value) is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: column `{column}`, row {row}: not a number of seconds: {value!r}"
        ) from None
    if not 0 <= seconds < math.inf:
        raise ConfigError(f"{where}: column `{column}`, row {row}: must be >= 0 and finite, got {value!r}")
    return seconds


@dataclass(frozen=True)
class TableRow:
    """One checked row of a fine-tuning table: its video, window and split, and every cell."""

    row: int
    source_uri: str
    """As `storage.list_objects` spells it (`evaluation.listed_uri`)."""
    split: str
    start_s: float | None
    end_s: float | None
    values: dict[str, Any]


def read_finetune_table(
    uri: str, config: ExperimentConfig, key: str, required: Sequence[str], needed: Sequence[str] = ()
) -> tuple[list[TableRow], set[str]]:
    """The rows of a fine-tuning table (`key`: finetune.labels, finetune.captions) and its column
    names. Checked: the `required` columns exist; `source_uri` and the `needed` cells are set;
    `start_s` < `end_s` when given; `split` is train or test (without the column: the hash
    hold-out of `finetune.test_fraction`); both splits have rows. ConfigError names the column
    and the row."""
    where = f"{key} {uri}"
    table = read_labels(uri, config, required, key)
    columns = set(table.column_names)
    rows = []
    for row, values in enumerate(table.to_pylist(), start=1):
        source = _text(values["source_uri"])
        if source is None:
            raise ConfigError(f"{where}: column `source_uri`, row {row}: empty")
        for column in needed:
            if _text(values[column]) is None:
                raise ConfigError(f"{where}: column `{column}`, row {row}: empty (every row needs one)")
        start = _seconds(values.get("start_s"), "start_s", row, where)
        end = _seconds(values.get("end_s"), "end_s", row, where)
        if end is not None and not end > (start or 0.0):
            raise ConfigError(f"{where}: columns `start_s` / `end_s`, row {row}: need start_s < end_s")
        if "split" in columns:
            split = (_text(values["split"]) or "").lower()
            if split not in SPLITS:
                raise ConfigError(
                    f"{where}: column `split`, row {row}: unknown value {values['split']!r} "
                    f"(expected {' or '.join(SPLITS)}; drop the column for a hold-out by video hash)"
                )
        else:
            split = holdout_split(source, config.finetune.test_fraction, config.source)
        rows.append(TableRow(row, listed_uri(source), split, start, end, values))
    if not rows:
        raise ConfigError(f"{where}: the table has no rows")
    for split in SPLITS:
        if not any(r.split == split for r in rows):
            how = (
                "its `split` column"
                if "split" in columns
                else f"the hash hold-out (finetune.test_fraction={config.finetune.test_fraction})"
            )
            raise ConfigError(f"{where}: no {split} row by {how}: training and scoring need both")
    return rows, columns


def read_classification_table(uri: str, config: ExperimentConfig) -> list[LabelledClip]:
    """Every row of `finetune.labels` (see the module doc), checked; ConfigError names the column."""
    rows, columns = read_finetune_table(uri, config, "finetune.labels", REQUIRED_COLUMNS, ["label"])
    has_pair = {"verb", "object"} <= columns
    clips = []
    for r in rows:
        verb = _text(r.values["verb"]) if has_pair else None
        obj = _text(r.values["object"]) if has_pair else None
        label = str(_text(r.values["label"]))
        clips.append(LabelledClip(r.row, r.source_uri, label, r.split, r.start_s, r.end_s, verb, obj))
    return clips


def classes_of(clips: list[LabelledClip]) -> list[str]:
    """The classes, sorted: the head's outputs, in order."""
    return sorted({c.label for c in clips})


def labels_digest(clips: list[LabelledClip], videos: list[dict[str, Any]]) -> str:
    """What a classifier was trained on: the table's rows (with their splits) and the ETag of
    every video it names, so a changed row, split or video file means a new classifier."""
    digest = hashlib.sha256(json.dumps([asdict(c) for c in clips], sort_keys=True).encode())
    for video in sorted(videos, key=lambda v: v["source_uri"]):
        digest.update(f"\n{video['source_uri']}\t{video['etag']}".encode())
    return digest.hexdigest()[:20]


def finetune_digest(settings: FinetuneConfig) -> str:
    """The training settings that make two classifiers the same (the table, the pretrained
    version and the registered name are told apart by their own tags)."""
    values = asdict(settings)
    # the captioner's keys too: finetune-caption has its own digest (videobert/captioning.py)
    for key in (
        "labels",
        "model_uri",
        "classifier_name",
        "log_every",
        "captions",
        "captioner_name",
        "captioner",
    ):
        values.pop(key)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


DECODE_KEYS = ("fps", "clip_frames", "size", "max_clips")
"""The decode settings a clip's visual word depends on."""


def check_decode(config: ExperimentConfig, model_uri: str, metadata: dict[str, Any]) -> None:
    """The table's videos are extracted with this config's `decode` section, and the classifier's
    predict decodes with the pretrained version's: both must cut the same clips."""
    registered = metadata.get("decode") or {}
    for key in DECODE_KEYS:
        if key in registered and registered[key] != getattr(config.decode, key):
            raise ConfigError(
                f"decode.{key} is {getattr(config.decode, key)!r} but {model_uri} was pretrained with "
                f"{registered[key]!r}: fine-tune with the config the model was pretrained with"
            )


# ---- visual words of each clip ---------------------------------------------------------------


def clip_words(
    config: ExperimentConfig, clips: Sequence[VideoWindow], codebook_uri: str
) -> tuple[dict[int, np.ndarray], dict[str, str]]:
    """row -> visual words (clip order, inside the row's window) of every clip whose video is
    extracted in the labelled set's tables (`evalset_root` of finetune.labels); and name -> why
    for each window without a clip. Unreadable videos are `unreadable_labelled_videos`'s."""
    words, _, empty = window_clips(config, str(config.finetune.labels), clips, codebook_uri)
    return words, empty


def window_clips(
    config: ExperimentConfig, table_uri: str, windows: Sequence[VideoWindow], codebook_uri: str
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict[str, str]]:
    """`clip_words` of the windows of any fine-tuning table (`table_uri`: its evalset tables),
    plus row -> the window's clip features [clips, dim] (float16, as extract stores them)."""
    from videobert.codebook import HierarchicalCodebook, default_device
    from videobert.token_shards import features_array

    layout = Layout(evalset_root(config, table_uri))
    manifest = rows_by_video(read_manifest(layout.output, config.s3))
    codebook = HierarchicalCodebook.load(codebook_uri, config.s3).to(default_device())
    videos: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for vid in sorted({c.video_id for c in windows}):  # id -> words, features, starts, ends
        if (manifest.get(vid) or {}).get("status") != "ok":
            continue
        table = storage.read_parquet_if_readable(layout.features_file(vid), config.s3)
        if table is None or table.num_rows == 0:
            continue
        table = table.sort_by("clip_index")
        starts, ends = (np.asarray(table[c].to_pylist(), np.float64) for c in ("start_s", "end_s"))
        features = features_array(table)
        videos[vid] = (codebook.assign(features), features, starts, ends)
    words, features, empty = {}, {}, {}
    for clip in windows:
        if clip.video_id not in videos:
            continue
        video_words, video_features, starts, ends = videos[clip.video_id]
        window = (clip.start_s or 0.0, math.inf if clip.end_s is None else clip.end_s)
        keep = np.asarray([in_window(s, e, *window) for s, e in zip(starts, ends, strict=True)], bool)
        if keep.any():
            words[clip.row] = np.asarray(video_words, np.int64)[keep]
            features[clip.row] = video_features[keep]
        else:
            empty[clip.name] = "no clip has its middle in the window"
    return words, features, empty


# ---- the head -------------------------------------------------------------------------------


TEMPLATE = zero_shot_template(ZERO_SHOT_PREFIX)
"""The paper's zero-shot template: the one whose [MASK] outputs the head sees
(`template_features`) when the pretrained version has no `evaluation.PREFIX_TAG`."""


def head_inputs(
    model: nn.Module,
    vocab: Any,
    words: Sequence[np.ndarray],
    max_len: int,
    template: tuple[np.ndarray, list[int]] | None = None,
    pooled: bool = True,
) -> torch.Tensor:
    """The head's input per clip (module doc): the pooled embedding [N, H] (`pooled`), then with
    `template` (`captioning.template_ids` of the zero-shot template) its mean [MASK] output [N, H]:
    [N, H] or [N, 2H]. Differentiable (grad is the caller's choice)."""
    from videobert.embedding import pooled_embeddings

    if not pooled and template is None:
        raise ValueError("the head takes the pooled embedding, the template's outputs or both")
    parts = [pooled_embeddings(model, vocab, words, max_len)[0].float()] if pooled else []
    if template is not None:
        parts.append(template_outputs(model, vocab, template, words, max_len))
    return torch.cat(parts, -1)


def template_outputs(
    model: nn.Module,
    vocab: Any,
    template: tuple[np.ndarray, list[int]],
    words: Sequence[np.ndarray],
    max_len: int,
) -> torch.Tensor:
    """[N, H]: per clip, the template's mean [MASK] output with the clip's visual words
    (`[CLS] template [>] video [SEP]`, `captioning.segment_parts`): the head's second part."""
    from videobert.captioning import segment_parts

    return segment_parts(model, vocab, template[0], template[1], words, max_len)[1]


class ClassifierHead(nn.Module):
    """Pooled embedding -> class logits: standardised by fixed statistics (the training
    embeddings' mean and deviation), then one linear layer."""

    def __init__(self, hidden: int, classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(hidden))
        self.register_buffer("std", torch.ones(hidden))
        self.linear = nn.Linear(hidden, classes)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.linear((embedding.float() - self.mean) / self.std)


ENCODER_SKIPPED = ("mlm_head.", "pooler.", "alignment.")
"""Pretraining heads: not on the classifier's path, so `full` leaves them as they are."""


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters `full` fine-tunes: embeddings and Transformer layers (the word embeddings
    are tied to the MLM decoder and listed once, as embeddings)."""
    return [p for name, p in model.named_parameters() if not name.startswith(ENCODER_SKIPPED)]


# ---- training and scoring (one process; pipelines/finetune_classify.py runs it as a Ray task) ---


@dataclass
class FinetuneTask:
    """Everything the training needs, shipped to its Ray task."""

    settings: FinetuneConfig
    model_uri: str
    """The pinned pretrained version, models:/<name>/<version>."""
    tokenizer_uri: str
    """The pretrained model's text tokenizer (zero-shot's template)."""
    s3: S3Config
    tracking_uri: str
    run_id: str
    """The MLflow run the per-step metrics go to."""
    classes: list[str]
    pairs: dict[str, tuple[str, str]] | None
    """label -> (verb, object) (`class_pairs`), for zero-shot."""
    train: list[tuple[np.ndarray, int]]
    """(visual words, class index) per training clip."""
    test: list[LabelledClip]
    test_words: list[np.ndarray]
    zero_shot_prefix: str = ZERO_SHOT_PREFIX
    """The words zero-shot and the head's template ask in: those of the pretrained version's
    own evaluation (`evaluation.PREFIX_TAG`), else the paper's."""


@dataclass
class TrainedClassifier:
    """What training returns to the driver: weights (CPU tensors) and test-split scores."""

    head: dict[str, torch.Tensor]
    encoder: dict[str, torch.Tensor] | None
    """The fine-tuned encoder's weights (`full`); None: the pretrained ones, unchanged."""
    test_scores: np.ndarray
    """[test clips, classes] class probabilities (blended with zero-shot's by
    `finetune.zero_shot_weight`)."""
    head_scores: np.ndarray
    """[test clips, classes] the head's own class probabilities."""
    train_metrics: dict[str, float]
    zero_shot_scores: np.ndarray
    """[test clips, classes] zero-shot class scores of the pretrained model (see the module doc)."""
    zero_shot_metrics: dict[str, float] = field(default_factory=dict)
    """zero_shot_verb_top1 / zero_shot_object_top1 when the classes are (verb, object) pairs."""


def class_pairs(clips: list[LabelledClip], classes: list[str]) -> dict[str, tuple[str, str]] | None:
    """label -> (verb, object) when the table's `verb` / `object` columns name one pair per class
    and each pair one class; else None (zero-shot then ranks the labels themselves)."""
    pairs: dict[str, set[tuple[str, str]]] = {}
    for clip in clips:
        if not (clip.verb and clip.object):
            return None
        pairs.setdefault(clip.label, set()).add((clip.verb, clip.object))
    if any(len(p) != 1 for p in pairs.values()) or len({next(iter(p)) for p in pairs.values()}) != len(
        classes
    ):
        return None
    return {label: next(iter(p)) for label, p in pairs.items()}


def zero_shot_words(
    classes: list[str], pairs: dict[str, tuple[str, str]] | None
) -> tuple[list[str], list[str]]:
    """The candidate verbs and objects zero-shot ranks for `classes` (sorted): the pairs' words,
    or with no pairs the labels themselves at both [MASK]s."""
    if pairs:
        return sorted({v for v, _ in pairs.values()}), sorted({o for _, o in pairs.values()})
    return sorted(classes), sorted(classes)


def class_log_scores(
    verb_scores: np.ndarray,
    object_scores: np.ndarray,
    classes: list[str],
    pairs: dict[str, tuple[str, str]] | None,
) -> np.ndarray:
    """[clips, classes] zero-shot class scores from `evaluation.template_word_scores` over
    `zero_shot_words(classes, pairs)` (module doc): log p(verb) + log p(object), or with no
    pairs the label's own logit at the object [MASK]."""
    verbs, objects = zero_shot_words(classes, pairs)
    if not pairs:
        return object_scores[:, [objects.index(c) for c in classes]]
    verb_log = torch.log_softmax(torch.as_tensor(verb_scores), -1).numpy()
    object_log = torch.log_softmax(torch.as_tensor(object_scores), -1).numpy()
    verb_at = [verbs.index(pairs[c][0]) for c in classes]
    object_at = [objects.index(pairs[c][1]) for c in classes]
    return verb_log[:, verb_at] + object_log[:, object_at]


def zero_shot_class_scores(
    model: nn.Module,
    vocab: Any,
    encode: Any,
    clips: list[LabelledClip],
    words: list[np.ndarray],
    classes: list[str],
    pairs: dict[str, tuple[str, str]] | None,
    max_len: int,
    prefix: str = ZERO_SHOT_PREFIX,
) -> tuple[dict[str, float], np.ndarray]:
    """The pretrained model's template scores of each class on `clips` (their `words`; module
    doc): the verb and object top-1 of `evaluation.zero_shot` when classes are (verb, object)
    `pairs` (else no metric), and the [clips, classes] score matrix (`class_log_scores`)."""
    verbs, objects = zero_shot_words(classes, pairs)
    truth = [pairs[c.label] for c in clips] if pairs else [(c.label, c.label) for c in clips]
    items = [ZeroShotItem(str(c.row), w.tolist(), *t) for c, w, t in zip(clips, words, truth, strict=True)]
    metrics, details = zero_shot(model, vocab, encode, items, max_len, verbs, objects, prefix)
    scores = class_log_scores(details["verb_scores"], details["object_scores"], classes, pairs)
    if not pairs:
        return {}, scores
    return {k: metrics[k] for k in ("zero_shot_verb_top1", "zero_shot_object_top1")}, scores


def blend_weight(settings: FinetuneConfig, pairs: dict[str, tuple[str, str]] | None) -> float:
    """The zero-shot weight a classifier blends with: `finetune.zero_shot_weight` when the classes
    are (verb, object) pairs, which the template's two [MASK]s name; 0 for a table of labels
    alone, whose zero-shot (a label's first WordPiece at one [MASK]) can be no better than
    chance: on the demo champion with object labels, two of them not words, the blend at 0.67
    fell to 0.50 where the head alone scored 1.00."""
    return settings.zero_shot_weight if pairs else 0.0


def blend_with_zero_shot(
    head_logits: torch.Tensor, zero_shot_scores: torch.Tensor, weight: float
) -> torch.Tensor:
    """[clips, classes] class probabilities: softmax of (1 - weight) x the head's log-probabilities
    + weight x zero-shot's (`finetune.zero_shot_weight`; 0: the head alone)."""
    logp = torch.log_softmax(head_logits.float(), -1)
    if weight:
        zero_shot_logp = torch.log_softmax(zero_shot_scores.float().to(logp.device), -1)
        logp = (1 - weight) * logp + weight * zero_shot_logp
    return torch.softmax(logp, -1)


def classification_metrics(
    prefix: str, scores: np.ndarray, targets: np.ndarray, classes: int
) -> tuple[dict[str, float], np.ndarray]:
    """`<prefix>_top1`, `<prefix>_top5` and the confusion matrix of class `scores` [N, C]."""
    metrics = {
        f"{prefix}_top1": top_k_accuracy(scores, targets, 1),
        f"{prefix}_top5": top_k_accuracy(scores, targets, min(5, classes)),
    }
    return metrics, confusion_matrix(targets, scores.argmax(1), classes)


def train_classifier(task: FinetuneTask) -> TrainedClassifier:
    """Zero-shot with the pretrained model, then train the head (and in `full` the encoder),
    logging `loss` and `batch_accuracy` every `finetune.log_every` steps into the run, then
    score the test clips (see the module doc)."""
    from videobert.captioning import template_ids
    from videobert.embedding import embedding_max_len
    from videobert.registry import load_registered_model
    from videobert.text_tokenizer import TextTokenizer
    from videobert.tracking import MetricsLogger, use_tracking_uri

    settings = task.settings
    use_tracking_uri(task.tracking_uri)  # a fresh worker: the registry of the driver
    model, vocab, meta = load_registered_model(task.model_uri)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    max_len = embedding_max_len(model, meta)

    # Before any fine-tuning: the template's accuracy of the pretrained model itself.
    encode = TextTokenizer.load(task.tokenizer_uri, task.s3).encode
    zs_max_len = int(meta.get("max_seq_len", model.config.max_positions))
    zs_metrics, zs_scores = zero_shot_class_scores(
        model,
        vocab,
        encode,
        task.test,
        task.test_words,
        task.classes,
        task.pairs,
        zs_max_len,
        task.zero_shot_prefix,
    )

    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    words = [w for w, _ in task.train]
    targets = torch.as_tensor([t for _, t in task.train], device=device)
    template = None
    if settings.template_features:
        template = template_ids(zero_shot_template(task.zero_shot_prefix), encode, vocab)

    def inputs_of(clip_words: Sequence[np.ndarray]) -> torch.Tensor:
        return head_inputs(model, vocab, clip_words, max_len, template, settings.pooled_features)

    with torch.no_grad():
        frozen = inputs_of(words)  # [N, H] or [N, 2H]
    head = ClassifierHead(frozen.shape[1], len(task.classes)).to(device)
    head.mean.copy_(frozen.mean(0))
    head.std.copy_(frozen.std(0, unbiased=False) + 1e-6)
    full = settings.mode == "full"
    groups = [{"params": list(head.parameters()), "lr": settings.lr}]
    if full:
        model.train()  # dropout on, as in pretraining
        groups.append({"params": encoder_parameters(model), "lr": settings.encoder_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    logger = MetricsLogger(task.run_id, task.tracking_uri)
    batch_size = min(settings.batch_size, len(words))
    for step in range(1, settings.steps + 1):
        batch = rng.choice(len(words), batch_size, replace=False)
        if full:
            inputs = inputs_of([words[i] for i in batch])
        else:
            inputs = frozen[torch.as_tensor(batch, device=device)]
        logits = head(inputs)
        loss = F.cross_entropy(logits, targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % settings.log_every == 0 or step == settings.steps:
            value, accuracy = loss.item(), (logits.argmax(1) == targets[batch]).float().mean().item()
            logger.log(step, {"loss": value, "batch_accuracy": accuracy})
            log.info("step %d/%d: loss %.4g, batch accuracy %.3f", step, settings.steps, value, accuracy)

    model.eval()
    with torch.no_grad():
        train_scores = head(inputs_of(words)) if full else head(frozen)
        test_logits = head(inputs_of(task.test_words))
    train_metrics = {"train_top1": float((train_scores.argmax(1) == targets).float().mean())}
    encoder = None
    if full:
        from videobert.model import weights_state_dict

        encoder = weights_state_dict(model)
    return TrainedClassifier(
        head={k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
        encoder=encoder,
        test_scores=blend_with_zero_shot(
            test_logits, torch.as_tensor(zs_scores), blend_weight(settings, task.pairs)
        )
        .cpu()
        .numpy()
        .astype(np.float64),
        head_scores=torch.softmax(test_logits, -1).cpu().numpy().astype(np.float64),
        train_metrics=train_metrics,
        zero_shot_metrics=zs_metrics,
        zero_shot_scores=zs_scores,
    )
