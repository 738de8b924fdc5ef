"""Evaluation metrics, a markdown report and its plots. Pure numpy: no Ray, no MLflow, no sklearn.

Inputs may be numpy arrays, lists or torch tensors (moved to the CPU here). Ties are broken
at random *in expectation*: a target tied with others gets the average of the ranks it could
take, so constant scores score exactly chance, never a perfect result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
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


def top_k_accuracy(scores: Any, targets: Any, k: int = 1) -> float:
    """Share of rows whose target class is among the k highest scores ([rows, classes])."""
    above, tied, _ = _target_scores(scores, targets)
    # The target lands uniformly on one of ranks above+1 .. above+tied.
    hits = np.clip(k - above, 0, tied) / tied
    return float(hits.mean()) if hits.size else float("nan")


def retrieval_ranks(scores: Any, targets: Any | None = None) -> np.ndarray:
    """1-based (expected) rank of each query's right item; `scores` is [queries, gallery].

    `targets` defaults to the diagonal (query i matches gallery item i).
    """
    scores = to_numpy(scores)
    targets = np.arange(scores.shape[0]) if targets is None else targets
    above, tied, _ = _target_scores(scores, targets)
    return above + (tied + 1) / 2.0


def retrieval_metrics(
    scores: Any, targets: Any | None = None, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k for each k and the median rank: {"recall_at_1": .., ..., "median_rank": ..}.

    Named `recall_at_k`, not `r@k`: MLflow metric names cannot hold "@".
    """
    scores = to_numpy(scores)
    targets = np.arange(scores.shape[0]) if targets is None else targets
    above, tied, _ = _target_scores(scores, targets)
    metrics = {f"recall_at_{k}": float((np.clip(k - above, 0, tied) / tied).mean()) for k in ks}
    metrics["median_rank"] = float(np.median(above + (tied + 1) / 2.0))
    return metrics


def confusion_matrix(targets: Any, predictions: Any, num_classes: int) -> np.ndarray:
    """[true class, predicted class] counts."""
    targets, predictions = to_numpy(targets).ravel(), to_numpy(predictions).ravel()
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (targets, predictions), 1)
    return matrix


def _format(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return "nan" if np.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_report(
    title: str,
    metrics: Mapping[str, Any],
    notes: Mapping[str, Any] | None = None,
    plots: Mapping[str, str] | None = None,
) -> str:
    """A markdown page: a metrics table, optional notes (model URI, data sizes...) and plot images.

    `plots` maps a caption to an image path relative to where the report is written.
    """
    lines = [f"# {title}", ""]
    if notes:
        lines += [f"- **{key}**: {_format(value)}" for key, value in notes.items()] + [""]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_format(value)} |" for name, value in metrics.items()]
    for caption, path in (plots or {}).items():
        lines += ["", f"## {caption}", "", f"![{caption}]({path})"]
    return "\n".join(lines) + "\n"


def _figure(width: float = 4.5, height: float = 4.0) -> Any:
    # A bare Figure renders with Agg and never touches pyplot's global state or a display.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def plot_roc(scores: Any, labels: Any, path: str | Path, title: str = "Alignment ROC") -> Path:
    """ROC curve with its AUC, as a PNG."""
    fpr, tpr, _ = roc_curve(scores, labels)
    figure = _figure()
    axes = figure.add_subplot()
    axes.plot(fpr, tpr, label=f"AUC = {roc_auc(scores, labels):.3f}")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1))
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return Path(path)


def plot_rank_histogram(ranks: Any, path: str | Path, title: str = "Text-to-video retrieval ranks") -> Path:
    """Histogram of retrieval ranks (1 is best), as a PNG."""
    ranks = to_numpy(ranks).astype(np.float64)
    figure = _figure()
    axes = figure.add_subplot()
    bins = np.arange(0.5, max(float(ranks.max()) if ranks.size else 1.0, 1.0) + 1.5)
    axes.hist(ranks, bins=bins)
    axes.set(xlabel="rank of the right video", ylabel="queries", title=title)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return Path(path)


def plot_confusion(
    matrix: Any, class_names: Sequence[str], path: str | Path, title: str = "Confusion"
) -> Path:
    """Confusion matrix with counts in the cells, as a PNG."""
    matrix = to_numpy(matrix)
    size = max(3.0, 0.6 * len(class_names) + 2)
    figure = _figure(size, size)
    axes = figure.add_subplot()
    axes.imshow(matrix, cmap="Blues")
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=list(class_names), rotation=45, ha="right")
    axes.set_yticks(ticks, labels=list(class_names))
    for (row, column), count in np.ndenumerate(matrix):
        axes.text(column, row, str(count), ha="center", va="center", fontsize=8)
    axes.set(xlabel="predicted", ylabel="true", title=title)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return Path(path)
