"""Evaluation metrics: ours (numpy, videobert.metrics) against scikit-learn, same inputs, same run.

    .venv/bin/python benchmarks/bench_evaluation.py [--n 1000000]

Prints seconds per call (best of 3) for each metric and the ratio ours/peer (< 1: ours is
faster), after checking both give the same value. Also times demo-corpus generation, which has
no peer (videos per second only).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from videobert.metrics import confusion_matrix, roc_auc, top_k_accuracy


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000, help="pairs for ROC AUC")
    parser.add_argument("--rows", type=int, default=20_000, help="rows for top-k and confusion")
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args()
    from sklearn import metrics

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, args.n)
    scores = rng.normal(size=args.n) + labels
    class_scores = rng.normal(size=(args.rows, args.classes))
    targets = rng.integers(0, args.classes, args.rows)
    predictions = class_scores.argmax(1)
    cases = {
        "roc_auc": (
            lambda: roc_auc(scores, labels),
            lambda: metrics.roc_auc_score(labels, scores),
        ),
        "top_5_accuracy": (
            lambda: top_k_accuracy(class_scores, targets, k=5),
            lambda: metrics.top_k_accuracy_score(targets, class_scores, k=5, labels=np.arange(args.classes)),
        ),
        "confusion_matrix": (
            lambda: confusion_matrix(targets, predictions, args.classes),
            lambda: metrics.confusion_matrix(targets, predictions, labels=np.arange(args.classes)),
        ),
    }
    print(f"{'metric':<18} {'ours s':>10} {'sklearn s':>10} {'ours/peer':>10}")
    for name, (ours, peer) in cases.items():
        ours_s, ours_value = best_of(3, ours)
        peer_s, peer_value = best_of(3, peer)
        np.testing.assert_allclose(ours_value, peer_value, rtol=1e-9)
        print(f"{name:<18} {ours_s:>10.4f} {peer_s:>10.4f} {ours_s / peer_s:>10.2f}")

    from videobert.demo_corpus import DemoSpec, generate_corpus

    spec = DemoSpec()
    with tempfile.TemporaryDirectory() as tmp:
        seconds, summary = best_of(1, lambda: generate_corpus(f"{tmp}/videos", spec))
    print(
        f"demo corpus: {summary.videos} videos in {seconds:.2f} s ({summary.videos / seconds:.1f} videos/s; no peer)"
    )


if __name__ == "__main__":
    main()
