"""Metric functions against hand-computed values and scikit-learn; the report and its plots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from videobert import metrics, reports


def test_masked_token_accuracy_skips_ignored_positions() -> None:
    # argmax per position: 2, 0, 1, 1 ; labels: 2, -100, 0, 1 -> 2 of 3 counted right
    logits = torch.tensor(
        [[[0.1, 0.2, 0.9], [5.0, 0.0, 0.0]], [[0.0, 1.0, 0.5], [0.2, 0.3, 0.1]]], dtype=torch.bfloat16
    )
    labels = torch.tensor([[2, -100], [0, 1]])
    assert metrics.masked_token_counts(logits, labels) == (2, 3)
    assert metrics.masked_token_accuracy(logits, labels) == pytest.approx(2 / 3)
    # already-argmaxed ids of the labels' shape work too
    assert metrics.masked_token_accuracy(np.array([2, 9, 0, 0]), np.array([2, -100, 0, 1])) == pytest.approx(
        2 / 3
    )
    assert np.isnan(metrics.masked_token_accuracy([1, 2], [-100, -100]))
    with pytest.raises(ValueError, match="shape"):
        metrics.masked_token_accuracy(np.zeros(3), np.zeros(4))


def test_binary_accuracy_and_auc_by_hand() -> None:
    scores = [0.9, 0.8, 0.4, 0.6, 0.1]
    labels = [1, 1, 1, 0, 0]
    # threshold 0.5: predicted 1,1,0,1,0 -> right on 0,1,4 -> 3/5
    assert metrics.binary_accuracy(scores, labels) == pytest.approx(0.6)
    # positive-negative pairs: (0.9,0.6)(0.9,0.1)(0.8,0.6)(0.8,0.1)(0.4,0.6)x(0.4,0.1) -> 5/6
    assert metrics.roc_auc(scores, labels) == pytest.approx(5 / 6)
    # a tie between a positive and a negative counts half
    assert metrics.roc_auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    assert metrics.roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 0])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="positive"):
        metrics.roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.binary_accuracy([0.1], [2])


def test_top_k_accuracy_by_hand() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.3, 0.3, 0.4]])
    targets = [1, 2, 0]
    # row 0: rank 1; row 1: rank 3; row 2: target 0.3 tied with class 1 below 0.4 -> rank 2 or 3
    assert metrics.top_k_accuracy(scores, targets, k=1) == pytest.approx(1 / 3)
    assert metrics.top_k_accuracy(scores, targets, k=2) == pytest.approx((1 + 0 + 0.5) / 3)
    assert metrics.top_k_accuracy(scores, targets, k=3) == pytest.approx(1.0)
    # constant scores are worth exactly chance, never a perfect score
    assert metrics.top_k_accuracy(np.zeros((4, 4)), [0, 1, 2, 3], k=1) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="outside"):
        metrics.top_k_accuracy(scores, [0, 1, 3])


def test_retrieval_metrics_by_hand() -> None:
    # query i should find gallery item i
    scores = np.array(
        [
            [0.9, 0.1, 0.0],  # rank 1
            [0.8, 0.5, 0.9],  # rank 3
            [0.2, 0.9, 0.4],  # rank 2
        ]
    )
    assert metrics.retrieval_ranks(scores).tolist() == [1.0, 3.0, 2.0]
    recalls_and_rank = metrics.retrieval_metrics(scores, ks=(1, 2, 10))
    assert recalls_and_rank == pytest.approx(
        {"recall_at_1": 1 / 3, "recall_at_2": 2 / 3, "recall_at_10": 1.0, "median_rank": 2.0}
    )
    # explicit targets: two queries for the same gallery item
    assert metrics.retrieval_ranks(scores[:2], targets=[0, 0]).tolist() == [1.0, 2.0]
    # all tied: expected rank is the middle
    assert metrics.retrieval_metrics(np.ones((5, 5)))["median_rank"] == pytest.approx(3.0)


def test_confusion_matrix_by_hand() -> None:
    matrix = metrics.confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], num_classes=3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_against_scikit_learn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + labels  # informative, no ties
    assert metrics.roc_auc(scores, labels) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores))
    fpr, tpr, thresholds = metrics.roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thresholds = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thresholds[1:], sk_thresholds[1:])
    # ties in the scores: sklearn also gives ties half credit
    tied = np.round(scores)
    assert metrics.roc_auc(tied, labels) == pytest.approx(sklearn_metrics.roc_auc_score(labels, tied))
    class_scores = rng.normal(size=(200, 7))
    targets = rng.integers(0, 7, 200)
    class_scores[np.arange(100), targets[:100]] += 1.5  # half the rows are easy
    for k in (1, 3, 5):
        expected = sklearn_metrics.top_k_accuracy_score(targets, class_scores, k=k, labels=np.arange(7))
        assert metrics.top_k_accuracy(class_scores, targets, k=k) == pytest.approx(expected)
    predictions = class_scores.argmax(1)
    np.testing.assert_array_equal(
        metrics.confusion_matrix(targets, predictions, 7),
        sklearn_metrics.confusion_matrix(targets, predictions, labels=range(7)),
    )


def test_report_and_plots(tmp_path) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 50)
    roc = reports.plot_roc(rng.random(50) + labels, labels, tmp_path / "roc.png")
    ranks = metrics.retrieval_ranks(rng.random((12, 12)))
    hist = reports.plot_rank_histogram(ranks, tmp_path / "ranks.png")
    confusion = reports.plot_confusion(
        metrics.confusion_matrix([0, 1, 2], [0, 2, 2], 3), ["a", "b", "c"], tmp_path / "c.png"
    )
    for path in (roc, hist, confusion):
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width > 100 and image.height > 100
            # not a blank canvas: the plot drew something
            assert len(set(image.convert("L").getdata())) > 5
    report = reports.markdown_report(
        "Evaluation of videobert v3",
        {"alignment_auc": 0.91234, "recall_at_1": 0.5, "masked_text_accuracy": float("nan"), "videos": 12},
        notes={"model": "models:/videobert/3"},
        plots={"ROC": "roc.png", "Ranks": "ranks.png"},
    )
    assert report.startswith("# Evaluation of videobert v3\n")
    assert "- **model**: models:/videobert/3" in report
    assert "| alignment_auc | 0.9123 |" in report
    assert "| masked_text_accuracy | nan |" in report
    assert "| videos | 12 |" in report
    assert "![ROC](roc.png)" in report and "![Ranks](ranks.png)" in report


def test_cross_modal_metrics_by_hand() -> None:
    """Alignment and retrieval from one score matrix; a video's other segments are neither
    negatives nor candidates."""
    videos = ["a", "a", "b", "c"]
    scores = np.array(
        [
            [2.0, 5.0, 1.0, 0.0],  # a's other segment (5.0) scores higher, but does not count
            [5.0, -1.0, 3.0, 0.0],
            [0.0, 0.0, 4.0, 1.0],
            [1.0, 2.0, 0.0, 0.5],
        ]
    )
    result = metrics.cross_modal_metrics(scores, videos, named=[True, False, True, False])
    positives = np.diag(scores)
    negatives = [scores[i, j] for i in range(4) for j in range(4) if videos[i] != videos[j]]
    by_pairs = np.mean([(p > n) + 0.5 * (p == n) for p in positives for n in negatives])
    assert result["alignment_auc"] == pytest.approx(by_pairs)
    assert result["alignment_pairs"] == 4 + 10
    assert result["alignment_accuracy"] == pytest.approx(0.5 * (3 / 4 + 5 / 10))
    assert result["retrieval_recall_at_1"] == pytest.approx(0.5)  # ranks 1, 3, 1, 3
    assert result["retrieval_median_rank"] == pytest.approx(2.0)
    assert result["retrieval_candidates"] == pytest.approx(3.5)
    assert result["retrieval_chance_recall_at_1"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 4 + 1 / 4) / 4)
    assert result["retrieval_recall_at_1_named"] == 1.0 and result["retrieval_queries_named"] == 2
    assert "retrieval_recall_at_1_named" not in metrics.cross_modal_metrics(scores, videos)


def test_named_texts_are_those_that_name_a_labelled_word() -> None:
    from videobert.evaluation import names_a_label

    words = {"slide", "circle"}
    assert names_a_label("Now let me show you how to slide the circle.", words)
    assert names_a_label("the circle's here", {"circle's"})
    assert not names_a_label("hello everyone.", words)
    assert not names_a_label("circles and sliders", words)  # whole words only
    assert not names_a_label("", words)


def test_narration_prefix_is_the_corpus_own_wording() -> None:
    """Zero-shot asks in the words the narrations say before "<verb> the <object>": the demo's
    "now let me show you how to", another corpus's most common opening, within one sentence."""
    from videobert.evaluation import narration_prefix

    demo = [
        "hello everyone. now let me show you how to slide the circle.",
        "now let me show you how to spin the star.",
        "that was easy.",
    ]
    assert narration_prefix(demo, ["slide", "spin"], ["circle", "star"]) == "now let me show you how to"
    other = [
        "good morning. watch me shrink the lemon now.",
        "here i bounce the kite slowly.",
        "watch me spin the leaf now.",
        "next we shrink the brick.",
    ]
    # "watch me" is said twice; the sentence before it ("good morning.") is not part of it
    assert (
        narration_prefix(other, ["shrink", "bounce", "spin"], ["lemon", "brick", "kite", "leaf"])
        == "watch me"
    )
    # a prefix needs a labelled verb and object, after at least one word of the sentence
    assert narration_prefix(["slide the circle now.", "i slide the square."], ["slide"], ["circle"]) is None
    assert narration_prefix([None, ""], ["slide"], ["circle"]) is None


def test_zero_shot_prefix_setting_wins_over_the_narrations() -> None:
    """`evaluate.zero_shot_prefix` is used as given; unset, the narrations' own words; none
    said, the paper's."""
    from videobert.config import load_config
    from videobert.evaluation import ZERO_SHOT_PREFIX, zero_shot_prefix

    said = ["watch me spin the star."]
    assert zero_shot_prefix(
        load_config(None, ["evaluate.zero_shot_prefix=look how i"]), said, ["spin"], ["star"]
    ) == ("look how i")
    assert zero_shot_prefix(load_config(None), said, ["spin"], ["star"]) == "watch me"
    assert zero_shot_prefix(load_config(None), ["hello."], ["spin"], ["star"]) == ZERO_SHOT_PREFIX
