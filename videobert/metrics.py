"""Evaluation metric arithmetic on scores and labels. Pure numpy: no Ray, no MLflow, no sklearn.

Inputs may be numpy arrays, lists or torch tensors (moved to the CPU here). Ties are broken
at random *in expectation*: a target tied with others gets the average of the ranks it could
take, so constant scores score exactly chance, never a perfect result.

Running the model to get the scores: videobert/evaluation.py. Plots and the markdown report:
videobert/reports.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100


def to_numpy(values: Any) -> np.ndarray:
    """numpy view of an array-like or a torch tensor (any device, any float dtype)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
        if values.is_floating_point():
            values = values.float()  # numpy has no bfloat16
        return values.numpy()
    return np.asarray(values)


def masked_token_counts(logits: Any, labels: Any, ignore_index: int = IGNORE_INDEX) -> tuple[int, int]:
    """(correct, counted) masked-LM predictions; positions labelled `ignore_index` are skipped.

    `logits` is [..., vocab] (argmax taken here, on its own device) or already-argmaxed ids
    with the shape of `labels`. Sum the counts over batches, then divide.
    """
    logits = logits if hasattr(logits, "ndim") else np.asarray(logits)
    labels = labels if hasattr(labels, "ndim") else np.asarray(labels)
    if logits.ndim == labels.ndim + 1:
        logits = logits.argmax(-1)
    predictions, targets = to_numpy(logits), to_numpy(labels)
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {targets.shape} differ in shape")
    counted = targets != ignore_index
    return int((predictions[counted] == targets[counted]).sum()), int(counted.sum())


def masked_token_accuracy(logits: Any, labels: Any, ignore_index: int = IGNORE_INDEX) -> float:
    """Share of masked positions predicted right (NaN when nothing is masked)."""
    correct, counted = masked_token_counts(logits, labels, ignore_index)
    return correct / counted if counted else float("nan")


def _binary_inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = to_numpy(scores).astype(np.float64).ravel(), to_numpy(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return scores, labels.astype(bool)


def binary_accuracy(scores: Any, labels: Any, threshold: float = 0.5) -> float:
    """Share of pairs where `score >= threshold` agrees with the 0/1 label."""
    scores, labels = _binary_inputs(scores, labels)
    return float(((scores >= threshold) == labels).mean())


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ascending, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], values.size]
    ranks = np.empty(values.size, np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count half."""
    scores, labels = _binary_inputs(scores, labels)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("ROC AUC needs at least one positive and one negative")
    rank_sum = _average_ranks(scores)[labels].sum()  # Mann-Whitney U
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), from (0, 0) to (1, 1).

    One point per distinct score, highest threshold first (the first threshold is +inf).
    """
    scores, labels = _binary_inputs(scores, labels)
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    true_positives = np.cumsum(labels)[last_of_each]
    false_positives = (last_of_each + 1) - true_positives
    tpr = np.r_[0.0, true_positives / max(labels.sum(), 1)]
    fpr = np.r_[0.0, false_positives / max((~labels).sum(), 1)]
    return fpr, tpr, np.r_[np.inf, scores[last_of_each]]


def _target_scores(scores: Any, targets: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(#scores above the target's, #scores tied with it including itself, n_candidates) per row."""
    scores = to_numpy(scores).astype(np.float64)
    targets = to_numpy(targets).astype(np.int64).ravel()
    if scores.ndim != 2 or scores.shape[0] != targets.size:
        raise ValueError(f"scores must be [rows, candidates] with one target per row, got {scores.shape}")
    if targets.size and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise ValueError("a target index is outside the candidates")
    target = scores[np.arange(targets.size), targets][:, None]
    return (scores > target).sum(1), (scores == target).sum(1), np.full(targets.size, scores.shape[1])


def _top_k_hits(above: np.ndarray, tied: np.ndarray, k: int) -> np.ndarray:
    """Per row, the chance that the target is in the top k.

    The target lands uniformly on one of ranks above+1 .. above+tied.
    """
    return np.clip(k - above, 0, tied) / tied


def _expected_ranks(above: np.ndarray, tied: np.ndarray) -> np.ndarray:
    """Per row, the target's 1-based rank averaged over the ways its ties could break."""
    return above + (tied + 1) / 2.0


def top_k_accuracy(scores: Any, targets: Any, k: int = 1) -> float:
    """Share of rows whose target class is among the k highest scores ([rows, classes])."""
    above, tied, _ = _target_scores(scores, targets)
    hits = _top_k_hits(above, tied, k)
    return float(hits.mean()) if hits.size else float("nan")


def _query_target_scores(scores: Any, targets: Any | None) -> tuple[np.ndarray, np.ndarray]:
    """`_target_scores` for retrieval, where query i matches gallery item i unless told otherwise."""
    scores = to_numpy(scores)
    targets = np.arange(scores.shape[0]) if targets is None else targets
    above, tied, _ = _target_scores(scores, targets)
    return above, tied


def retrieval_ranks(scores: Any, targets: Any | None = None) -> np.ndarray:
    """1-based (expected) rank of each query's right item; `scores` is [queries, gallery].

    `targets` defaults to the diagonal (query i matches gallery item i).
    """
    return _expected_ranks(*_query_target_scores(scores, targets))


def retrieval_metrics(
    scores: Any, targets: Any | None = None, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k for each k and the median rank: {"recall_at_1": .., ..., "median_rank": ..}.

    Named `recall_at_k`, not `r@k`: MLflow metric names cannot hold "@".
    """
    above, tied = _query_target_scores(scores, targets)
    metrics = {f"recall_at_{k}": float(_top_k_hits(above, tied, k).mean()) for k in ks}
    metrics["median_rank"] = float(np.median(_expected_ranks(above, tied)))
    return metrics


def confusion_matrix(targets: Any, predictions: Any, num_classes: int) -> np.ndarray:
    """[true class, predicted class] counts."""
    targets, predictions = to_numpy(targets).ravel(), to_numpy(predictions).ravel()
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (targets, predictions), 1)
    return matrix


def cross_modal_metrics(scores: Any, video_ids: Sequence[str], named: Any | None = None) -> dict[str, float]:
    """Alignment and text->video retrieval from one score matrix of held-out segments.

    `scores[i, j]` is the alignment logit of segment i's text with segment j's video. Segment
    i's own video is the positive; the videos of segments from *other* videos are negatives
    (another segment of the same video is neither: it may show the same thing). Alignment:
    ROC AUC over every positive and negative pair, and balanced accuracy at logit 0 (what a
    1:1 draw of negatives measures, without the noise of drawing them). Retrieval ranks each
    text's own video among all segments except its video's other segments.

    `named` (bool per segment), when given, adds the same metrics over the queries it
    marks with the suffix `_named`: e.g. texts that name a labelled object or verb,
    apart from fillers ("hello everyone.") that no model can match to a video.
    """
    scores = to_numpy(scores).astype(np.float64)
    videos = np.asarray(video_ids)
    n = len(videos)
    if scores.shape != (n, n):
        raise ValueError(f"scores {scores.shape} for {n} segments")
    same_video = videos[:, None] == videos[None, :]
    metrics = _cross_modal(scores, same_video, np.ones(n, bool), "")
    if named is not None and np.asarray(named, bool).any():
        metrics |= _cross_modal(scores, same_video, np.asarray(named, bool), "_named")
    return metrics


def _cross_modal(
    scores: np.ndarray, same_video: np.ndarray, queries: np.ndarray, suffix: str
) -> dict[str, float]:
    negatives = ~same_video & queries[:, None]
    positives = np.diag(scores)[queries]
    if not negatives.any():
        return {}
    negative_scores = scores[negatives]
    pair_scores = np.concatenate([positives, negative_scores])
    pair_labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negative_scores))])
    gallery = np.where(same_video & ~np.eye(len(scores), dtype=bool), -np.inf, scores)[queries]
    targets = np.flatnonzero(queries)
    candidates = (~(same_video & ~np.eye(len(scores), dtype=bool))).sum(1)[queries]
    metrics = {
        "alignment_auc": roc_auc(pair_scores, pair_labels),
        "alignment_accuracy": 0.5 * (float((positives > 0).mean()) + float((negative_scores <= 0).mean())),
        "alignment_pairs": float(len(pair_scores)),
        "retrieval_queries": float(queries.sum()),
        "retrieval_candidates": float(candidates.mean()),
        "retrieval_chance_recall_at_1": float((1.0 / candidates).mean()),
    }
    metrics |= {f"retrieval_{k}": v for k, v in retrieval_metrics(gallery, targets).items()}
    return {k + suffix: v for k, v in metrics.items()}


def combined_metric(metrics: dict[str, float], weights: dict[str, float]) -> float | None:
    """Weighted mean of `metrics` named in `weights` (evaluate.combined_weights); None when one
    of them is missing or not finite, so a partial evaluation never wins a promotion."""
    values = [metrics.get(name) for name in weights]
    if any(v is None or not np.isfinite(v) for v in values):
        return None
    return float(sum(w * v for w, v in zip(weights.values(), values, strict=True)) / sum(weights.values()))
