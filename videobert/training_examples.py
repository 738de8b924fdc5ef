"""Training examples from token rows: the paper's three regimes, masking, packing.

A batch of token rows (aligned segments of `tokens/`) becomes a batch of examples, one per
row, with the three regimes of VideoBERT mixed in every batch (in equal shares by default,
`examples.regime_weights`):

- text-only MLM:   `[CLS] text [SEP]`                (token type 0)
- video-only MLM:  `[CLS] video [SEP]`               (token type 1)
- text+video:      `[CLS] text [>] video [SEP]`      MLM + linguistic-visual alignment on [CLS];
  half the pairs are misaligned, their video drawn from another segment of the batch
  (another video when the batch has one). Misaligned pairs are masked like aligned ones,
  but their masked tokens are not MLM targets (`examples.misaligned_masking`): masking
  only aligned pairs would let the alignment head read "has a [MASK]" instead of the match.

Augmentations from the paper: the video tokens are subsampled at a random rate of 1-5 steps,
and a segment is randomly concatenated with its following neighbours of the same video.
15% of the non-special tokens (`examples.mask_prob`) are masked with the 80/10/10 rule
(random replacements come from the same modality). Examples are then packed into rows of
`max_len` tokens without padding between them (see videobert/model.py for why packing).

Continuous video input (`model.video_input: features | both`, CBT): each segment also
carries its clips' features (`TrainingSegment.features`, joined from extract's features
tables by `videobert.token_shards.FeatureJoiner`). A batch pools them once; an example points
into the pool (`feature_rows`, the clip fed at each video position, -1 where none: text,
specials, masked video) and names the clip a masked video position must pick out
(`target_rows`, for the InfoNCE loss). Masking a video position then means: 80% [MASK] (no
feature), 10% another clip's feature, 10% kept. With `features` the masked visual words are not
cross-entropy targets (the model has no visual-word input); with `both` they are.

Pure numpy: deterministic for a given `numpy.random.Generator`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from videobert.config import ExamplesConfig
from videobert.model import CLS, MASK, SEP, TEXT_TYPE, VIDEO_SEP, VIDEO_TYPE, JointVocab

REGIMES = ("text", "video", "joint")
TEXT, VIDEO, JOINT = range(3)
IGNORE = -100


@dataclass
class TrainingSegment:
    """One token row as the example builder reads it: ids, not text and times (see align.Segment)."""

    video_id: str
    segment_index: int
    text_ids: np.ndarray  # tokenizer ids
    video_tokens: np.ndarray  # codebook ids
    features: np.ndarray | None = None  # [len(video_tokens), dim] clip features, when joined


@dataclass
class Example:
    input_ids: np.ndarray  # joint ids after masking
    token_type_ids: np.ndarray
    labels: np.ndarray  # original joint id at masked positions, IGNORE elsewhere
    regime: int  # TEXT, VIDEO or JOINT
    aligned: int  # 1 aligned, 0 misaligned, -1 when not a text+video example
    subsample: int  # video subsampling rate used (0 when no video)
    feature_rows: np.ndarray | None = None  # pool row of the clip fed at each position, -1 none
    target_rows: np.ndarray | None = None  # pool row a masked video position must pick out, -1 none

    def __len__(self) -> int:
        return len(self.input_ids)


def segments_from_columns(columns: Mapping[str, Sequence[Any]]) -> list[TrainingSegment]:
    """Token rows as columns (a Ray Data numpy batch, a pyarrow table's pydict) -> segments.

    A `video_features` column (one [clips, dim] array per row) is carried along when present."""
    features = columns.get("video_features")
    segments = []
    for n, (video, index, text, video_tokens) in enumerate(
        zip(
            columns["video_id"],
            columns["segment_index"],
            columns["text_ids"],
            columns["video_tokens"],
            strict=True,
        )
    ):
        tokens = np.asarray(video_tokens if video_tokens is not None else [], dtype=np.int64)
        clip_features = None
        if features is not None:
            clip_features = np.asarray(features[n], np.float32).reshape(len(tokens), -1)
        segments.append(
            TrainingSegment(
                str(video),
                int(index),
                np.asarray(text if text is not None else [], dtype=np.int64),
                tokens,
                clip_features,
            )
        )
    return segments


class FeaturePool:
    """The clip features of one batch, stacked once; examples point into it by row."""

    def __init__(self, arrays: Sequence[np.ndarray], dim: int | None = None) -> None:
        arrays = [a for a in arrays if a is not None and len(a)]
        if arrays:
            self.features = np.concatenate(arrays).astype(np.float32, copy=False)
        else:
            self.features = np.zeros((0, dim or 1), np.float32)
        # The same clip can sit in two segments (a clip under two sentences): same id, so the
        # contrastive loss does not count it as its own negative.
        ids: dict[bytes, int] = {}
        self.clip_ids = np.asarray(
            [ids.setdefault(row.tobytes(), len(ids)) for row in self.features], np.int64
        )

    def rows_of(self, segments: Sequence[TrainingSegment]) -> list[np.ndarray]:
        """Pool rows of each segment's clips (segments in the order the pool was built)."""
        out, start = [], 0
        for s in segments:
            n = 0 if s.features is None else len(s.features)
            out.append(np.arange(start, start + n, dtype=np.int64))
            start += n
        return out


def regime_plan(n: int, weights: Sequence[float]) -> np.ndarray:
    """`n` regimes in the shares `weights` (largest remainder), ordered text, video, joint."""
    shares = np.asarray(weights, np.float64) / np.sum(weights) * n
    counts = np.floor(shares).astype(int)
    for r in np.argsort(-(shares - counts), kind="stable")[: n - counts.sum()]:
        counts[r] += 1
    return np.repeat(np.arange(len(REGIMES)), counts)


def build_sequence(
    vocab: JointVocab, regime: int, text: np.ndarray, video: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unmasked joint ids and token types of one regime's input, cut to `max_len` tokens.

    TEXT: `[CLS] text [SEP]`; VIDEO: `[CLS] video [SEP]`; JOINT: `[CLS] text [>] video [SEP]`.
    `text` holds tokenizer ids and `video` codebook ids; both come back as joint ids (int64).
    """
    budget = max_len - (3 if regime == JOINT else 2)
    if regime == JOINT:
        # Keep both modalities: text gets at most half unless the video is shorter.
        text_len = min(len(text), max(budget // 2, budget - len(video)))
        text, video = text[:text_len], video[: budget - text_len]
        ids = np.concatenate([[CLS], vocab.text_ids(text), [VIDEO_SEP], vocab.video_ids(video), [SEP]])
        types = np.concatenate([np.full(len(text) + 2, TEXT_TYPE), np.full(len(video) + 1, VIDEO_TYPE)])
    elif regime == TEXT:
        ids = np.concatenate([[CLS], vocab.text_ids(text[:budget]), [SEP]])
        types = np.full(len(ids), TEXT_TYPE)
    else:
        ids = np.concatenate([[CLS], vocab.video_ids(video[:budget]), [SEP]])
        types = np.full(len(ids), VIDEO_TYPE)
    return ids.astype(np.int64), types.astype(np.int64)


class ExampleBuilder:
    """Builds masked, packed training batches from batches of token rows."""

    def __init__(
        self,
        vocab: JointVocab,
        max_len: int,
        config: ExamplesConfig | None = None,
        video_input: str = "tokens",
    ) -> None:
        if max_len < 8:
            raise ValueError("max_len must be >= 8")
        self.vocab = vocab
        self.max_len = max_len  # longest example (and packed row), in tokens
        self.config = config or ExamplesConfig()
        self.video_input = video_input  # model.video_input: tokens | features | both

    # -- one example -----------------------------------------------------------------------

    def _span(
        self, segments: list[TrainingSegment], i: int, rng: np.random.Generator
    ) -> list[TrainingSegment]:
        """Segment i, randomly concatenated with its following neighbours of the same video."""
        span = [segments[i]]
        if self.config.max_concat > 1 and rng.random() < self.config.concat_prob:
            extra = int(rng.integers(1, self.config.max_concat))
            for j in range(i + 1, min(i + 1 + extra, len(segments))):
                prev, nxt = segments[j - 1], segments[j]
                if nxt.video_id != prev.video_id or nxt.segment_index != prev.segment_index + 1:
                    break
                span.append(nxt)
        return span

    def _subsample(
        self, video: np.ndarray, rng: np.random.Generator, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, int, np.ndarray | None]:
        rate = int(rng.integers(1, self.config.max_subsample + 1))
        offset = int(rng.integers(0, rate))
        picked = video[offset::rate]
        if not len(picked):
            return video[:1], rate, None if rows is None else rows[:1]
        return picked, rate, None if rows is None else rows[offset::rate]

    def _mask(
        self,
        ids: np.ndarray,
        maskable: np.ndarray,
        rng: np.random.Generator,
        feature_rows: np.ndarray | None = None,
        pool_size: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """15% of maskable positions: 80% [MASK], 10% a random token of the same modality, 10% kept.

        With `feature_rows` (updated in place), a [MASK]ed video position loses its feature and a
        replaced one gets a random clip of the pool (`pool_size` rows)."""
        candidates = np.flatnonzero(maskable)
        chosen = candidates[rng.random(len(candidates)) < self.config.mask_prob]
        if len(chosen) == 0 and len(candidates):
            chosen = rng.choice(candidates, size=1)
        labels = np.full_like(ids, IGNORE)
        labels[chosen] = ids[chosen]
        masked = ids.copy()
        action = rng.random(len(chosen))
        masked[chosen[action < 0.8]] = MASK
        swap = chosen[(action >= 0.8) & (action < 0.9)]
        is_video = self.vocab.is_video(ids[swap])
        random_text = self.vocab.text_ids(rng.integers(0, self.vocab.text_size, len(swap)))
        random_video = self.vocab.video_ids(rng.integers(0, self.vocab.num_visual, len(swap)))
        masked[swap] = np.where(is_video, random_video, random_text)
        if feature_rows is not None:
            feature_rows[chosen[action < 0.8]] = -1
            swapped = swap[is_video]
            if len(swapped) and pool_size:
                feature_rows[swapped] = rng.integers(0, pool_size, len(swapped))
        return masked, labels

    def _example(
        self,
        regime: int,
        text: np.ndarray,
        video: np.ndarray,
        aligned: int,
        rate: int,
        rng: np.random.Generator,
        rows: np.ndarray | None = None,
        pool_size: int = 0,
    ) -> Example:
        ids, types = build_sequence(self.vocab, regime, text, video, self.max_len)
        feature_rows = None if rows is None else video_feature_rows(self.vocab, ids, rows)
        policy = self.config.misaligned_masking
        if aligned == 0 and policy == "none":
            return Example(ids, types, np.full_like(ids, IGNORE), regime, aligned, rate, feature_rows)
        maskable = ids >= self.vocab.text_offset
        original_rows = None if feature_rows is None else feature_rows.copy()
        masked, labels = self._mask(ids, maskable, rng, feature_rows, pool_size)
        if aligned == 0 and policy == "input":
            labels = np.full_like(ids, IGNORE)
        target_rows = None
        if original_rows is not None:
            is_target = (labels != IGNORE) & self.vocab.is_video(ids)
            target_rows = np.where(is_target, original_rows, -1)
            if self.video_input == "features":  # no visual-word input: no visual-word targets
                labels = np.where(is_target, IGNORE, labels)
        return Example(masked, types, labels, regime, aligned, rate, feature_rows, target_rows)

    # -- a batch ---------------------------------------------------------------------------

    def examples(self, segments: list[TrainingSegment], rng: np.random.Generator) -> list[Example]:
        """One example per segment; regimes assigned in equal shares (as far as the data allows)."""
        return self.examples_and_pool(segments, rng)[0]

    def examples_and_pool(
        self, segments: list[TrainingSegment], rng: np.random.Generator
    ) -> tuple[list[Example], FeaturePool | None]:
        """`examples`, and the batch's feature pool when the model takes features."""
        self.check_ids(segments)
        order = sorted(range(len(segments)), key=lambda i: (segments[i].video_id, segments[i].segment_index))
        segments = [segments[i] for i in order]
        pool, rows_of = None, None
        if self.video_input != "tokens":
            missing = [s for s in segments if s.features is None and len(s.video_tokens)]
            if missing:
                raise ValueError(
                    f"model.video_input is {self.video_input!r} but video {missing[0].video_id} segment "
                    f"{missing[0].segment_index} comes without clip features (join them: FeatureJoiner)"
                )
            pool = FeaturePool([s.features for s in segments])
            rows_of = pool.rows_of(segments)
        regimes = rng.permutation(regime_plan(len(segments), self.config.regime_weights))
        out: list[Example] = []
        for i, regime in enumerate(regimes):
            span = self._span(segments, i, rng)
            text = np.concatenate([s.text_ids for s in span])
            video = np.concatenate([s.video_tokens for s in span])
            rows = None if rows_of is None else np.concatenate(rows_of[i : i + len(span)])
            if not len(text) and not len(video):
                continue
            if not len(text):
                regime = VIDEO  # no narration: only video-only MLM can use it
            elif not len(video):
                regime = TEXT
            aligned, rate = -1, 0
            if regime == JOINT:
                aligned = int(rng.random() >= self.config.misaligned_fraction)
                if not aligned:
                    other = self._misaligned_video(segments, i, len(span), rng)
                    if other is None:
                        aligned = 1
                    else:
                        video = segments[other].video_tokens
                        rows = None if rows_of is None else rows_of[other]
            if regime != TEXT:
                video, rate, rows = self._subsample(video, rng, rows)
            pool_size = 0 if pool is None else len(pool.features)
            out.append(self._example(int(regime), text, video, aligned, rate, rng, rows, pool_size))
        return out, pool

    def check_ids(self, segments: list[TrainingSegment]) -> None:
        """Token ids outside the vocabulary mean shards from another tokenizer or codebook."""
        for s in segments:
            if len(s.text_ids) and not 0 <= s.text_ids.min() <= s.text_ids.max() < self.vocab.text_size:
                raise ValueError(
                    f"video {s.video_id} segment {s.segment_index}: text id outside the tokenizer's "
                    f"{self.vocab.text_size} tokens (shards from another tokenizer?)"
                )
            if (
                len(s.video_tokens)
                and not 0 <= s.video_tokens.min() <= s.video_tokens.max() < self.vocab.num_visual
            ):
                raise ValueError(
                    f"video {s.video_id} segment {s.segment_index}: visual word outside the codebook's "
                    f"{self.vocab.num_visual} words (shards from another codebook?)"
                )

    def _misaligned_video(
        self, segments: list[TrainingSegment], i: int, span: int, rng: np.random.Generator
    ) -> int | None:
        """A segment outside the span, with video tokens: another video's when possible."""
        own = segments[i].video_id
        with_video = [j for j, s in enumerate(segments) if len(s.video_tokens)]
        others = [j for j in with_video if segments[j].video_id != own]
        if not others:  # a single-video batch: a segment of the same video outside the span
            others = [j for j in with_video if not i <= j < i + span]
        if not others:
            return None
        return int(rng.choice(others))

    def batch(self, columns: Mapping[str, Sequence[Any]], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Token rows (columns) -> one packed training batch."""
        examples, pool = self.examples_and_pool(segments_from_columns(columns), rng)
        return pack(examples, self.max_len, pool=pool)


def video_feature_rows(vocab: JointVocab, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Pool row of each position of an unmasked sequence: the video positions (visual words,
    in order) take `rows` in order, every other position -1."""
    out = np.full(len(ids), -1, np.int64)
    video_at = np.flatnonzero(vocab.is_video(ids))
    out[video_at] = rows[: len(video_at)]
    return out


def pack(
    examples: list[Example], max_len: int, multiple_of: int = 8, pool: FeaturePool | None = None
) -> dict[str, np.ndarray]:
    """First-fit-decreasing packing of examples into rows of at most `max_len` tokens.

    Returns arrays for VideoBert.forward: `input_ids`, `token_type_ids`, `position_ids`,
    `seq_ids` [R, T] (seq_ids 0 = padding, positions restart per example); the MLM targets as
    flat positions into R*T (`mlm_positions`, `mlm_labels`, `mlm_regime`, `mlm_is_video`); and
    the alignment targets (`cls_positions`, `align_labels`) of text+video examples.
    With a feature `pool`, also the clip features fed (`feature_positions`, `features`) and
    the InfoNCE targets (`nce_positions`, `nce_features`, `nce_clip_ids`).
    """
    if not examples:
        raise ValueError("no examples to pack (every segment had neither text nor video tokens)")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        size = len(examples[i])
        for r, used in enumerate(fill):
            if used + size <= max_len:
                rows[r].append(i)
                fill[r] += size
                break
        else:
            rows.append([i])
            fill.append(size)
    width = min(max_len, -(-max(fill) // multiple_of) * multiple_of)
    shape = (len(rows), width)
    input_ids = np.zeros(shape, np.int64)
    token_types = np.zeros(shape, np.int64)
    positions = np.zeros(shape, np.int64)
    seq_ids = np.zeros(shape, np.int64)
    labels = np.full(shape, IGNORE, np.int64)
    regime = np.zeros(shape, np.int64)
    feature_rows = np.full(shape, -1, np.int64)
    target_rows = np.full(shape, -1, np.int64)
    cls_positions, align_labels = [], []
    for r, members in enumerate(rows):
        start = 0
        for n, i in enumerate(members, start=1):
            ex = examples[i]
            end = start + len(ex)
            input_ids[r, start:end] = ex.input_ids
            token_types[r, start:end] = ex.token_type_ids
            positions[r, start:end] = np.arange(len(ex))
            seq_ids[r, start:end] = n
            labels[r, start:end] = ex.labels
            regime[r, start:end] = ex.regime
            if ex.feature_rows is not None:
                feature_rows[r, start:end] = ex.feature_rows
            if ex.target_rows is not None:
                target_rows[r, start:end] = ex.target_rows
            if ex.regime == JOINT:
                cls_positions.append(r * width + start)
                align_labels.append(ex.aligned)
            start = end
    flat_labels = labels.reshape(-1)
    mlm_positions = np.flatnonzero(flat_labels != IGNORE)
    mlm_labels = flat_labels[mlm_positions]
    extra: dict[str, np.ndarray] = {}
    if pool is not None:
        flat_rows, flat_targets = feature_rows.reshape(-1), target_rows.reshape(-1)
        feature_positions = np.flatnonzero(flat_rows >= 0)
        nce_positions = np.flatnonzero(flat_targets >= 0)
        extra = {
            "feature_positions": feature_positions.astype(np.int64),
            "features": pool.features[flat_rows[feature_positions]],
            "nce_positions": nce_positions.astype(np.int64),
            "nce_features": pool.features[flat_targets[nce_positions]],
            "nce_clip_ids": pool.clip_ids[flat_targets[nce_positions]],
        }
    return {
        **extra,
        "input_ids": input_ids,
        "token_type_ids": token_types,
        "position_ids": positions,
        "seq_ids": seq_ids,
        "mlm_positions": mlm_positions.astype(np.int64),
        "mlm_labels": mlm_labels,
        "mlm_regime": regime.reshape(-1)[mlm_positions],
        "mlm_is_video": token_types.reshape(-1)[mlm_positions].astype(bool),
        "cls_positions": np.asarray(cls_positions, np.int64),
        "align_labels": np.asarray(align_labels, np.float32),
        "num_tokens": np.asarray(int((seq_ids > 0).sum())),
        "num_examples": np.asarray(len(examples)),
    }
