"""Evaluating a VideoBERT model on held-out token rows (Ray-free, one process).

- held-out MLM accuracy on text and video tokens (the training objective, no augmentation);
- linguistic-visual alignment accuracy and ROC AUC on aligned vs misaligned pairs;
- text->video retrieval scored by the alignment head (R@1/5/10, median rank);
- zero-shot classification with the paper's template "now let me show you how to [MASK] the
  [MASK]" followed by the video's tokens: verb and object top-1/top-5 over the label set.

This module runs the model; the metric arithmetic on its scores is videobert/metrics.py, the
plots and markdown report videobert/reports.py.
"""

from __future__ import annotations

import hashlib
import io
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import torch

from videobert import reports, storage
from videobert.config import ConfigError, ExamplesConfig, ExperimentConfig
from videobert.metrics import (
    confusion_matrix,
    cross_modal_metrics,
    retrieval_ranks,
    top_k_accuracy,
)
from videobert.model import CLS, MASK, SEP, TEXT_TYPE, VIDEO_SEP, VIDEO_TYPE, JointVocab, VideoBert
from videobert.tables import Layout, read_manifest, upsert_manifest, video_id
from videobert.training import forward, to_device
from videobert.training_examples import (
    IGNORE,
    JOINT,
    Example,
    ExampleBuilder,
    FeaturePool,
    build_sequence,
    pack,
    video_feature_rows,
)
from videobert.videos import is_up_to_date, relinked_rows, rows_by_video, videos_to_do

ZERO_SHOT_PREFIX = "now let me show you how to"
PREFIX_TAG = "zero_shot_prefix"
"""On a model version evaluate scored: the words its zero-shot template asked in
(`zero_shot_prefix`), which finetune-classify's zero-shot and head template reuse."""


def in_holdout(key: str, fraction: float) -> bool:
    """Deterministic split by video (`key`: its `holdout_key`): the same videos are held out by
    pretrain and evaluate, on every run."""
    if fraction <= 0:
        return False
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


def holdout_key(uri: str, root: str) -> str:
    """What the hash hold-out hashes: the video's path under the corpus root, so the split is
    the same wherever the corpus lives (a local directory, a bucket, another checkout or
    temporary directory); the whole URI for a video outside the root. Both are spelled as
    `listed_uri` spells them (the manifest's URIs already are)."""
    return uri.removeprefix(root.rstrip("/") + "/")


def held_out_video_ids(config: ExperimentConfig) -> set[str]:
    """The video_ids of the corpus's hash hold-out (`evaluate.holdout_fraction`), from the
    manifest's source URIs: pretraining never sees them and evaluate scores them."""
    fraction = config.evaluate.holdout_fraction
    if fraction <= 0:
        return set()
    root = listed_uri(config.source)
    manifest = read_manifest(config.output, config.s3).select(["video_id", "source_uri"]).to_pylist()
    return {row["video_id"] for row in manifest if in_holdout(holdout_key(row["source_uri"], root), fraction)}


def joint_example(
    vocab: JointVocab,
    text_ids: Sequence[int],
    video_tokens: Sequence[int],
    max_len: int,
    feature_rows: np.ndarray | None = None,
) -> Example:
    """Unmasked `[CLS] text [>] video [SEP]` (text keeps at most half when both are long).

    `feature_rows`: the video's clips in a FeaturePool, for a model that takes features."""
    text = np.asarray(text_ids, np.int64)
    video = np.asarray(video_tokens, np.int64)
    ids, types = build_sequence(vocab, JOINT, text, video, max_len)
    rows = None if feature_rows is None else video_feature_rows(vocab, ids, feature_rows)
    return Example(ids, types, np.full(len(ids), IGNORE, np.int64), JOINT, 1, 1, rows)


def feature_inputs(
    vocab: JointVocab, ids: np.ndarray, features: np.ndarray | None, device: Any
) -> dict[str, torch.Tensor]:
    """`feature_positions` / `features` for one unpacked row of ids (batch of 1): the clip
    features in order at the video positions; nothing for a model without features."""
    if features is None:
        return {}
    video_at = np.flatnonzero(vocab.is_video(ids))
    return {
        "feature_positions": torch.as_tensor(video_at, device=device),
        "features": torch.as_tensor(np.asarray(features[: len(video_at)], np.float32), device=device),
    }


@torch.no_grad()
def _alignment_scores(
    model: VideoBert,
    examples: list[Example],
    max_len: int,
    chunk: int = 256,
    pool: FeaturePool | None = None,
) -> np.ndarray:
    """Alignment logit of every (joint) example, in order."""
    scores = np.empty(len(examples), np.float32)
    for start in range(0, len(examples), chunk):
        part = examples[start : start + chunk]
        # Tag each example so its [CLS] can be found after packing reorders them.
        for i, ex in enumerate(part):
            ex.aligned = i
        batch = pack(part, max_len, pool=pool)
        device = next(model.parameters()).device
        out = forward(model, to_device(batch, device))
        logits = out["alignment_logits"].float().cpu().numpy()
        order = batch["align_labels"].astype(np.int64)  # the tags, in packed order
        scores[start + order] = logits
    return scores


@dataclass
class HeldOut:
    """Held-out token rows as columns (video_id, segment_index, text_ids, video_tokens, and
    video_features when the model takes clip features)."""

    columns: dict[str, list]

    @property
    def num_rows(self) -> int:
        return len(self.columns["video_id"])


@torch.no_grad()
def mlm_metrics(
    model: VideoBert, vocab: JointVocab, rows: HeldOut, max_len: int, seed: int = 0
) -> dict[str, float]:
    """Masked-token accuracy on text and on video tokens (every regime, fixed seed)."""
    builder = ExampleBuilder(
        vocab, max_len, ExamplesConfig(concat_prob=0.0, max_subsample=1), model.config.video_input
    )
    rng = np.random.default_rng(seed)
    counts = {"text": [0, 0], "video": [0, 0], "video_nce": [0, 0]}
    device = next(model.parameters()).device
    chunk = 128
    for start in range(0, rows.num_rows, chunk):
        part = {k: v[start : start + chunk] for k, v in rows.columns.items()}
        batch = builder.batch(part, rng)
        out = forward(model, to_device(batch, device))
        predictions = out["mlm_logits"].argmax(-1).cpu().numpy()
        hits = predictions == batch["mlm_labels"]
        for name, selected in (("text", ~batch["mlm_is_video"]), ("video", batch["mlm_is_video"])):
            counts[name][0] += int(hits[selected].sum())
            counts[name][1] += int(selected.sum())
        if "nce_predicted" in out and len(out["nce_predicted"]):
            # Masked clip -> which of the chunk's masked clips? (CBT's video objective)
            pred = torch.nn.functional.normalize(out["nce_predicted"].float(), dim=-1)
            target = torch.nn.functional.normalize(out["nce_targets"].float(), dim=-1)
            ids = torch.as_tensor(batch["nce_clip_ids"], device=pred.device)
            counts["video_nce"][0] += int((ids[(pred @ target.T).argmax(-1)] == ids).sum())
            counts["video_nce"][1] += len(ids)
    nce_hits, nce_total = counts.pop("video_nce")
    metrics = {
        f"{name}_mlm_accuracy": (hit / total if total else float("nan"))
        for name, (hit, total) in counts.items()
    }
    if nce_total:  # a model that takes clip features: masked clip picked out among the chunk's
        metrics["video_nce_accuracy"] = nce_hits / nce_total
    return metrics


def cross_modal_eval(
    model: VideoBert,
    vocab: JointVocab,
    rows: HeldOut,
    max_len: int,
    named: Sequence[bool] | None = None,
    max_items: int = 64,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Alignment and text->video retrieval over held-out segments, from one score matrix:
    score[i, j] = alignment(text_i, video_j), every pair fed unmasked (metrics.cross_modal_metrics).

    At most `max_items` segments with both text and video (a seeded draw when there are more);
    `named` marks the segments whose text names a labelled class (reported apart).
    Returns the metrics and, for the plots, the pair probabilities, labels and ranks.
    """
    cols = rows.columns
    usable = [i for i in range(rows.num_rows) if len(cols["text_ids"][i]) and len(cols["video_tokens"][i])]
    if len(usable) > max_items:
        usable = sorted(np.random.default_rng(seed).choice(usable, max_items, replace=False).tolist())
    videos = [cols["video_id"][i] for i in usable]
    if len(usable) < 2 or len(set(videos)) < 2:
        return {}, {}
    pool, rows_of = None, [None] * len(usable)
    if model.config.takes_features:
        clip_features = [cols["video_features"][j] for j in usable]
        pool = FeaturePool([np.asarray(f, np.float32) for f in clip_features])
        starts = np.cumsum([0] + [len(f) for f in clip_features])
        rows_of = [np.arange(starts[n], starts[n + 1]) for n in range(len(usable))]
    examples = [
        joint_example(vocab, cols["text_ids"][i], cols["video_tokens"][j], max_len, rows_of[n])
        for i in usable
        for n, j in enumerate(usable)
    ]
    scores = _alignment_scores(model, examples, max_len, pool=pool).reshape(len(usable), len(usable))
    named_usable = None if named is None else [bool(named[i]) for i in usable]
    metrics = cross_modal_metrics(scores, videos, named_usable)
    same_video = np.asarray(videos)[:, None] == np.asarray(videos)[None, :]
    pair_scores = np.concatenate([np.diag(scores), scores[~same_video]])
    details = {
        "probabilities": 1 / (1 + np.exp(-pair_scores)),
        "labels": np.concatenate([np.ones(len(usable)), np.zeros(int((~same_video).sum()))]),
        "ranks": retrieval_ranks(np.where(same_video & ~np.eye(len(usable), dtype=bool), -np.inf, scores)),
    }
    return metrics, details


def names_a_label(text: str, label_words: set[str]) -> bool:
    """Does a segment's text name one of the labelled verbs or objects (a whole word)? Texts
    that do are what alignment can be judged on; a filler ("hello everyone.") names nothing."""
    return not label_words.isdisjoint(re.findall(r"[a-z0-9']+", text.lower()))


@dataclass
class ZeroShotItem:
    """One labelled video: its visual words (in order) and its true verb and object."""

    video_id: str
    video_tokens: list[int]
    verb: str
    object: str
    features: np.ndarray | None = None  # [clips, dim], for a model that takes clip features


def narration_prefix(
    texts: Sequence[str | None], verbs: Sequence[str], objects: Sequence[str], max_words: int = 8
) -> str | None:
    """The words a corpus's narrations most often say right before "<verb> the <object>" (a
    labelled verb and object, within one sentence), or None when none says one.

    Zero-shot asks the model in the corpus's own words: the paper's template ("now let me show
    you how to") suits YouCook2's narrators, and a corpus that never says it gives its [MASK]s
    nothing (README, "Results": chance on the second corpus, 0.83-0.92 verbs in its own words).
    Of the prefixes of 1 to `max_words` words, the longest whose most common one is still said
    before at least half as many pairs as the most common single word; ties by text.
    """
    verb_set, object_set = {v.lower() for v in verbs}, {o.lower() for o in objects}
    counts: dict[int, dict[str, int]] = {n: {} for n in range(1, max_words + 1)}
    for text in texts:
        for sentence in re.split(r"[.!?;]", (text or "").lower()):
            words = re.findall(r"[a-z0-9']+", sentence)
            for i in range(1, len(words) - 2):
                if words[i] in verb_set and words[i + 1] == "the" and words[i + 2] in object_set:
                    for n in range(1, min(i, max_words) + 1):
                        key = " ".join(words[i - n : i])
                        counts[n][key] = counts[n].get(key, 0) + 1
    best = {n: min(c.items(), key=lambda kv: (-kv[1], kv[0])) for n, c in counts.items() if c}
    if not best:
        return None
    floor = best[1][1] / 2
    return best[max(n for n, (_, count) in best.items() if count >= floor)][0]


def zero_shot_prefix(
    config: ExperimentConfig,
    trained_texts: Sequence[str | None],
    verbs: Sequence[str],
    objects: Sequence[str],
) -> str:
    """The zero-shot template's prefix: `evaluate.zero_shot_prefix`, else the training
    narrations' own (`narration_prefix`), else the paper's."""
    if config.evaluate.zero_shot_prefix is not None:
        return config.evaluate.zero_shot_prefix
    return narration_prefix(trained_texts, verbs, objects) or ZERO_SHOT_PREFIX


def zero_shot_template(prefix: str) -> str:
    """The zero-shot template's text, "`prefix` [MASK] the [MASK]" (what `zero_shot` asks)."""
    return f"{prefix} [MASK] the [MASK]"


@torch.no_grad()
def template_word_scores(
    model: VideoBert,
    vocab: JointVocab,
    encode_text: Callable[[str], list[int]],
    videos: Sequence[tuple[str, Sequence[int], np.ndarray | None]],
    verbs: Sequence[str],
    objects: Sequence[str],
    max_len: int,
    prefix: str = ZERO_SHOT_PREFIX,
) -> tuple[np.ndarray, np.ndarray]:
    """The template "`prefix` [MASK] the [MASK]" against each video ((name for messages, visual
    words, clip features or None) in order): [videos, verbs] and [videos, objects], each
    candidate word's logit of its first WordPiece at its [MASK] (see `zero_shot`)."""
    verb_ids = np.asarray([vocab.text_ids(encode_text(v)[0]) for v in verbs])
    object_ids = np.asarray([vocab.text_ids(encode_text(o)[0]) for o in objects])
    prefix_ids = vocab.text_ids(np.asarray(encode_text(prefix), np.int64))
    the = vocab.text_ids(np.asarray(encode_text("the"), np.int64))
    text = np.concatenate([prefix_ids, [MASK], the, [MASK]]).astype(np.int64)
    verb_mask_at = 1 + len(prefix_ids)
    object_mask_at = verb_mask_at + 1 + len(the)
    device = next(model.parameters()).device
    verb_scores = np.zeros((len(videos), len(verbs)), np.float32)
    object_scores = np.zeros((len(videos), len(objects)), np.float32)
    for n, (name, tokens, features) in enumerate(videos):
        video = vocab.video_ids(np.asarray(tokens, np.int64))[: max_len - len(text) - 3]
        ids = np.concatenate([[CLS], text, [VIDEO_SEP], video, [SEP]]).astype(np.int64)
        types = np.concatenate([np.full(len(text) + 2, TEXT_TYPE), np.full(len(video) + 1, VIDEO_TYPE)])
        input_ids = torch.as_tensor(ids, device=device)[None]  # [T] -> [1, T]
        token_types = torch.as_tensor(types.astype(np.int64), device=device)[None]
        positions = torch.as_tensor([verb_mask_at, object_mask_at], device=device)
        if model.config.takes_features and features is None:
            raise ValueError(f"{name}: the model takes clip features but the video has none")
        inputs = feature_inputs(vocab, ids, features if model.config.takes_features else None, device)
        out = model(input_ids, token_types, mlm_positions=positions, **inputs)
        logits = out["mlm_logits"].float().cpu().numpy()
        verb_scores[n] = logits[0, verb_ids]
        object_scores[n] = logits[1, object_ids]
    return verb_scores, object_scores


def zero_shot(
    model: VideoBert,
    vocab: JointVocab,
    encode_text: Callable[[str], list[int]],
    items: list[ZeroShotItem],
    max_len: int,
    verbs: list[str] | None = None,
    objects: list[str] | None = None,
    prefix: str = ZERO_SHOT_PREFIX,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The template "`prefix` [MASK] the [MASK]" (the paper's by default) against each video;
    candidates ranked by the masked-token logits (`template_word_scores`).

    Each candidate word is scored by the logit of its first WordPiece at its [MASK]: the
    label set, not the whole vocabulary, is ranked (as a classifier over the labels). The
    candidates are `verbs` / `objects` (the whole labelled set's classes; chance is one over
    their number), by default the classes that occur among `items`.
    """
    if not items:
        return {}, {}
    verbs = sorted(set(verbs or ()) | {item.verb for item in items})
    objects = sorted(set(objects or ()) | {item.object for item in items})
    videos = [(item.video_id, item.video_tokens, item.features) for item in items]
    verb_scores, object_scores = template_word_scores(
        model, vocab, encode_text, videos, verbs, objects, max_len, prefix
    )
    verb_targets = np.asarray([verbs.index(item.verb) for item in items])
    object_targets = np.asarray([objects.index(item.object) for item in items])
    metrics = {
        "zero_shot_verb_top1": top_k_accuracy(verb_scores, verb_targets, 1),
        "zero_shot_verb_top5": top_k_accuracy(verb_scores, verb_targets, 5),
        "zero_shot_object_top1": top_k_accuracy(object_scores, object_targets, 1),
        "zero_shot_object_top5": top_k_accuracy(object_scores, object_targets, 5),
        "zero_shot_items": float(len(items)),
        "zero_shot_object_chance": 1.0 / len(objects),
        "zero_shot_verb_chance": 1.0 / len(verbs),
    }
    details = {
        "object_confusion": confusion_matrix(object_targets, object_scores.argmax(1), len(objects)),
        "verb_confusion": confusion_matrix(verb_targets, verb_scores.argmax(1), len(verbs)),
        "objects": np.asarray(objects),
        "verbs": np.asarray(verbs),
        "object_scores": object_scores,  # [items, objects]: a classifier over other classes reuses them
        "verb_scores": verb_scores,
    }
    return metrics, details


def rows_to_columns(table: pa.Table, joiner: Any = None) -> HeldOut:
    """Token rows (TOKENS_SCHEMA) -> the columns the example builder reads; with a
    `token_shards.FeatureJoiner`, their clips' features too (`video_features`)."""
    names = ["video_id", "segment_index", "text_ids", "video_tokens"]
    if joiner is None:
        return HeldOut(table.select(names).to_pydict())
    columns = table.select([*names, "start_s", "end_s"]).to_pydict()
    columns = joiner(columns)
    columns.pop("start_s"), columns.pop("end_s")
    return HeldOut(columns)


# ---- the evaluate stage (Ray glue: pipelines/evaluate.py) --------------------------------------


def read_labels(
    uri: str,
    config: ExperimentConfig,
    columns: Sequence[str] = ("source_uri", "verb", "object"),
    key: str = "evaluate.labels",
) -> pa.Table:
    """A labelled set: CSV or Parquet with these `columns` (evaluate's: source_uri, verb, object);
    a missing column is a ConfigError naming `key`."""
    if uri.endswith(".parquet"):
        table = storage.read_parquet(uri, config.s3)
    else:
        table = pacsv.read_csv(io.BytesIO(storage.read_bytes(uri, config.s3)))
    missing = set(columns) - set(table.column_names)
    if missing:
        raise ConfigError(f"{key} {uri}: missing columns {sorted(missing)}")
    return table


def label_classes(config: ExperimentConfig) -> tuple[list[str], list[str]]:
    """Every verb and object of the labelled set: the zero-shot candidates."""
    if not config.evaluate.labels:
        return [], []
    labels = read_labels(config.evaluate.labels, config)
    return sorted(set(map(str, labels["verb"].to_pylist()))), sorted(
        set(map(str, labels["object"].to_pylist()))
    )


def listed_uri(uri: str) -> str:
    """A labelled `source_uri` spelled as `storage.list_objects` lists it (local paths resolved),
    so its video_id is the one extract gives the same file."""
    return uri if storage.is_s3(uri) else str(Path(uri).resolve())


def labelled_video_ids(config: ExperimentConfig) -> set[str]:
    """The video_id of every labelled video (none without `evaluate.labels`): tokenize keeps
    them out of `tokens/`, so pretraining never sees a video that zero-shot scores."""
    if not config.evaluate.labels:
        return set()
    labels = read_labels(config.evaluate.labels, config)
    return {video_id(listed_uri(str(u))) for u in labels["source_uri"].to_pylist()}


def evalset_root(config: ExperimentConfig, labels: str | None = None) -> str:
    """Where a labelled set's own tables live: `<output>/evalsets/<digest of its URI>/` (`labels`,
    default evaluate.labels; finetune.labels has its own), laid out as `output` is (videos/,
    features/, tokens/, tokens_manifest/; `tables.Layout`). Nothing under it is listed by
    tokenize or read by pretrain."""
    labels = listed_uri(labels or config.evaluate.labels or "")
    return storage.join(config.output, "evalsets", hashlib.sha256(labels.encode()).hexdigest()[:16])


def evalset_config(config: ExperimentConfig, labels: str | None = None) -> ExperimentConfig:
    """`config` with `output` (and `source`) moved to the labelled set's tables: extract's
    committer and tokenize's plan, writers and commit then work on them unchanged. Its labels
    are unset, since tokenize would otherwise leave out every labelled video, i.e. all of them."""
    root = evalset_root(config, labels)
    return replace(config, output=root, source=root, evaluate=replace(config.evaluate, labels=None))


def _objects_near(
    uris: list[str], config: ExperimentConfig
) -> tuple[dict[str, storage.ObjectInfo], set[str]]:
    """The objects in every folder that holds a labelled video, one listing per folder rather
    than requests per video and sidecar; also the folders that could be listed."""
    found: dict[str, storage.ObjectInfo] = {}
    listed = set()
    for folder in sorted({uri.rpartition("/")[0] for uri in uris}):
        try:
            found.update((o.uri, o) for o in storage.list_objects(folder, config.s3))
            listed.add(folder)
        except storage.StorageError:  # e.g. no such directory: each video is asked on its own
            continue
    return found, listed


def _object(
    uri: str, objects: dict[str, storage.ObjectInfo], listed: set[str], config: ExperimentConfig
) -> storage.ObjectInfo | None:
    """`uri`'s object from the listing of its folder, else asked on its own; None if missing."""
    if uri in objects or uri.rpartition("/")[0] in listed:
        return objects.get(uri)
    return storage.object_info(uri, config.s3)


@dataclass
class EvalSetPlan:
    """What evaluate does to the labelled videos before scoring them."""

    videos: list[dict[str, Any]]
    """Every labelled video that exists, as `list_videos` describes a video."""
    missing: dict[str, str]
    """source_uri -> reason, for each labelled video that cannot be read (no such object)."""
    adopt: list[dict[str, Any]]
    """Videos under `source` that extract already made features of: copied, not decoded."""
    todo: list[dict[str, Any]]
    """Videos to decode and encode (extract's code, into the evalset's tables)."""
    relinked: list[dict[str, Any]]
    """Evalset manifest rows whose transcript sidecar changed (as extract's relinking)."""
    manifest: dict[str, dict[str, Any]]
    """video_id -> its current evalset manifest row."""


def plan_evalset(config: ExperimentConfig, encoder: str, labels: str | None = None) -> EvalSetPlan:
    """Compare the videos of a labelled set (`labels`, default evaluate.labels) with its evalset's
    manifest by extract's skip rule (`is_up_to_date`): only new, changed or failed (when
    retried) videos are done again."""
    if labels:  # another stage's table (checked by that stage): only its videos matter here
        column = read_labels(labels, config, ["source_uri"], "labels")["source_uri"]
    else:
        column = read_labels(config.evaluate.labels, config)["source_uri"] if config.evaluate.labels else []
    uris = sorted({listed_uri(str(u)) for u in column})
    objects, listed = _objects_near(uris, config)
    videos, missing = [], {}
    for uri in uris:
        # The sidecar rule of `list_videos`: same stem, first transcript extension, either case.
        base = uri.rpartition(".")[0]
        sidecars = [f"{base}.{e}" for t in config.decode.transcript_extensions for e in (t, t.upper())]
        try:
            info = _object(uri, objects, listed, config)
            transcript = next((c for c in sidecars if _object(c, objects, listed, config)), None)
        except storage.StorageError as error:
            missing[uri] = f"read: {error}"
            continue
        if info is None:
            missing[uri] = "read: no such object"
            continue
        videos.append(
            {
                "video_id": video_id(info.uri),
                "source_uri": info.uri,
                "etag": info.etag,
                "size": info.size,
                "transcript_uri": transcript,
            }
        )
    done = rows_by_video(read_manifest(evalset_root(config, labels), config.s3))
    stale = videos_to_do(videos, done, config.extract.retry_errors, encoder=encoder)
    stale_ids = {v["video_id"] for v in stale}
    extracted = rows_by_video(read_manifest(config.output, config.s3))
    adopt = [
        v
        for v in stale
        if is_up_to_date(extracted.get(v["video_id"]), v, False, encoder=encoder)
        and extracted[v["video_id"]]["status"] == "ok"
    ]
    adopted = {v["video_id"] for v in adopt}
    todo = [v for v in stale if v["video_id"] not in adopted]
    kept = [v for v in videos if v["video_id"] not in stale_ids and done[v["video_id"]]["status"] == "ok"]
    return EvalSetPlan(videos, missing, adopt, todo, relinked_rows(done, kept), done)


def adopt_extracted(
    config: ExperimentConfig, videos: list[dict[str, Any]], labels: str | None = None
) -> None:
    """Copy extract's committed features of these videos into the evalset's tables (of `labels`,
    default evaluate.labels): the file first, then its manifest row (the commit rule), so
    nothing under `source` is decoded twice."""
    source, target = Layout(config.output), Layout(evalset_root(config, labels))
    extracted = rows_by_video(read_manifest(config.output, config.s3))
    rows = []
    for video in videos:
        vid = video["video_id"]
        table = storage.read_parquet(source.features_file(vid), config.s3)
        storage.write_parquet(table, target.features_file(vid), config.s3)
        row = {k: v for k, v in extracted[vid].items() if k not in ("updated_at", "transcript_error")}
        rows.append({**row, "transcript_uri": video["transcript_uri"]})
    upsert_manifest(target.output, rows, config.s3)


def unreadable_labelled_videos(
    config: ExperimentConfig,
    plan: EvalSetPlan,
    token_errors: dict[str, str] | None = None,
    labels: str | None = None,
) -> dict[str, str]:
    """source_uri -> why, for every labelled video (of `labels`, default evaluate.labels) that
    cannot be scored: a missing object, an evalset manifest row in error (decode, read,
    features), or a tokenize error."""
    unreadable = dict(plan.missing)
    manifest = rows_by_video(read_manifest(evalset_root(config, labels), config.s3))
    by_id = {v["video_id"]: v["source_uri"] for v in plan.videos}
    for vid, uri in by_id.items():
        row = manifest.get(vid)
        if row is None:
            unreadable[uri] = "not extracted"
        elif row["status"] != "ok":
            unreadable[uri] = str(row["error"])
    for vid, error in (token_errors or {}).items():
        unreadable.setdefault(by_id.get(vid, vid), error)
    return dict(sorted(unreadable.items()))


def zero_shot_items(
    labels: pa.Table, tokens: pa.Table, joiner: Any = None
) -> tuple[list[ZeroShotItem], dict[str, str]]:
    """Every labelled video with token rows in `tokens`, with all its visual words in segment
    order (and their clip features, with a `token_shards.FeatureJoiner`); and source_uri -> why
    for each labelled video that has none."""
    words_of: dict[str, list[int]] = {}
    features_of: dict[str, list[np.ndarray]] = {}
    if joiner is not None:
        joined = joiner(tokens.select(["video_id", "start_s", "end_s", "video_tokens"]).to_pydict())
        for vid, feats in zip(joined["video_id"], joined["video_features"], strict=True):
            features_of.setdefault(vid, []).append(feats)
    for vid, segment in zip(tokens["video_id"].to_pylist(), tokens["video_tokens"].to_pylist(), strict=True):
        words_of.setdefault(vid, []).extend(segment)
    items, unscored = [], {}
    for row in labels.to_pylist():
        uri = listed_uri(str(row["source_uri"]))
        vid = video_id(uri)
        words = words_of.get(vid)
        if words:
            feats = np.concatenate(features_of[vid]) if joiner is not None else None
            items.append(ZeroShotItem(vid, words, str(row["verb"]), str(row["object"]), feats))
        else:
            unscored[uri] = "no visual words (not extracted or not tokenized)"
    return items, unscored


def evaluate_model(
    config: ExperimentConfig, model_uri: str
) -> tuple[dict[str, float], dict[str, Path], dict]:
    """Load the model and score it: MLM, alignment and retrieval on the hash hold-out of
    `tokens/`, zero-shot on every labelled video (the evalset's tokens, which evaluate made
    beforehand with the model's codebook and tokenizer). Returns metrics, plot files and the
    model's metadata, with `unscored_labelled_videos` (source_uri -> why) added to it."""
    import torch

    from videobert.registry import load_registered_model
    from videobert.text_tokenizer import TextTokenizer
    from videobert.token_shards import FeatureJoiner, read_tokens
    from videobert.tracking import tracking_uri, use_tracking_uri

    use_tracking_uri(tracking_uri(config))  # this may run in a Ray worker process
    model, vocab, meta = load_registered_model(model_uri)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    max_len = int(meta.get("max_seq_len", config.model.max_seq_len))
    codebook_version, tokenizer_version = meta["codebook_version"], meta["tokenizer_version"]
    tokens = read_tokens(config.output, codebook_version, tokenizer_version, config.s3)
    held_out = held_out_video_ids(config)
    held = [v in held_out for v in tokens["video_id"].to_pylist()]
    holdout = tokens.filter(pa.array(held, pa.bool_()))
    items: list[ZeroShotItem] = []
    unscored: dict[str, str] = {}
    label_words: set[str] = set()
    takes_features = model.config.takes_features
    # A model that takes clip features reads them from extract's tables of each set.
    tokens_joiner = FeatureJoiner(config.output, config.s3) if takes_features else None
    labelled_joiner = FeatureJoiner(evalset_root(config), config.s3) if takes_features else None
    labelled = None
    if config.evaluate.labels:
        labels_table = read_labels(config.evaluate.labels, config)
        labelled = read_tokens(evalset_root(config), codebook_version, tokenizer_version, config.s3)
        items, unscored = zero_shot_items(labels_table, labelled, labelled_joiner)
        scored = {item.video_id for item in items}
        label_words = {word.lower() for item in items for word in (item.verb, item.object)}
        # The labelled videos are never trained on either: they join the hash hold-out for
        # MLM, alignment and retrieval (more held-out pairs, steadier figures).
        labelled = labelled.filter(pa.array([v in scored for v in labelled["video_id"].to_pylist()]))
    if holdout.num_rows == 0 and not items:
        raise ConfigError(
            f"no held-out token rows (evaluate.holdout_fraction={config.evaluate.holdout_fraction}, "
            f"{tokens.num_rows} rows in all) and no labelled video to score (evaluate.labels="
            f"{config.evaluate.labels}): raise the fraction, add videos or set evaluate.labels"
        )
    rows: HeldOut = rows_to_columns(holdout, tokens_joiner)
    if labelled is not None:
        more = rows_to_columns(labelled, labelled_joiner)
        rows = HeldOut({k: list(v) + list(more.columns[k]) for k, v in rows.columns.items()})
        holdout = pa.concat_tables([holdout.select(labelled.schema.names), labelled])
    named = [names_a_label(str(text or ""), label_words) for text in holdout["text"].to_pylist()]
    metrics: dict[str, float] = {"heldout_segments": float(rows.num_rows)}
    metrics |= mlm_metrics(model, vocab, rows, max_len, seed=config.train.seed)
    cross_modal, pairs = cross_modal_eval(model, vocab, rows, max_len, named, seed=config.train.seed)
    metrics |= cross_modal
    probabilities, labels, ranks = (pairs.get(k, np.zeros(0)) for k in ("probabilities", "labels", "ranks"))
    tokenizer = TextTokenizer.load(Layout(config.output).tokenizer(tokenizer_version), config.s3)
    verbs, objects = label_classes(config)
    # the training narrations' own words (the hold-out and labelled videos unseen)
    trained_on = tokens.filter(pa.array([not h for h in held], pa.bool_()))["text"].to_pylist()
    prefix = zero_shot_prefix(config, trained_on, verbs, objects)
    zs_metrics, zs_details = zero_shot(model, vocab, tokenizer.encode, items, max_len, verbs, objects, prefix)
    metrics |= zs_metrics
    meta = {**meta, "unscored_labelled_videos": unscored, "zero_shot_template": zero_shot_template(prefix)}
    meta["zero_shot_prefix"] = prefix

    plots_dir = Path(tempfile.mkdtemp(prefix="videobert-eval-"))
    plots: dict[str, Path] = {}
    if len(labels) and len(set(labels.tolist())) == 2:
        plots["alignment_roc.png"] = reports.plot_roc(probabilities, labels, plots_dir / "alignment_roc.png")
    if len(ranks):
        plots["retrieval_ranks.png"] = reports.plot_rank_histogram(ranks, plots_dir / "retrieval_ranks.png")
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
