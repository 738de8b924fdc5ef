"""The evaluation report: a markdown page and its PNG plots (matplotlib, no pyplot state).

The numbers come from videobert/metrics.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from videobert.metrics import roc_auc, roc_curve, to_numpy


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
