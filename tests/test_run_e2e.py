"""The whole pipeline learns: demo corpus -> `videobert run` -> an evaluated, promoted champion.

On the demo corpus with random S3D weights, the trained debug model's zero-shot object
accuracy on the labelled videos (one per class, kept out of pretraining) must beat chance at
least 3x and beat the same model untrained, and its verb accuracy 2x; and its alignment head
must tell a held-out narration's own video from others' (AUC) and retrieve it (R@1, median
rank). The recipe that makes this reliable on 2 CPU cores is configs/demo.yaml's (9 videos a
class, 2-s clips, 64 visual words, two thirds of the examples text+video at mask rate 0.3, big
batches, lr 3e-3, video subsampling at most 2, 5,000 steps). (That a second `run` does no work,
and that `run` survives kills, is tested on a smaller corpus in tests/test_run_faults.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines import run as run_stage
from pipelines.demo_corpus import demo_spec
from videobert.config import load_config
from videobert.demo_corpus import generate_corpus
from videobert.evaluation import evalset_root, label_classes, read_labels, zero_shot, zero_shot_items
from videobert.model import build_model
from videobert.registry import CHAMPION, alias_version, load_registered_model
from videobert.tables import Layout
from videobert.text_tokenizer import TextTokenizer
from videobert.token_shards import read_tokens
from videobert.tracking import tracking_uri, use_tracking_uri

REPO = Path(__file__).resolve().parent.parent

# The whole demo run is the module fixture's setup: 420-460 s idle on 2 cores, over the suite's
# 600 s per-test limit on a busy machine.
pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def demo_run(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    overrides = [
        f"source={root / 'videos'}",
        f"output={root / 'out'}",
        f"evaluate.labels={root / 'labels.csv'}",
        f"finetune.labels={root / 'classes.csv'}",
        f"finetune.captions={root / 'captions.csv'}",
    ]
    config = load_config(REPO / "configs/demo.yaml", overrides)
    generate_corpus(
        config.source,
        demo_spec(config.demo),
        labels_uri=config.evaluate.labels,
        classes_uri=config.finetune.labels,
        captions_uri=config.finetune.captions,
    )
    first = run_stage.run(config)
    return root, overrides, first


def champion_of(overrides: list[str]):
    """(config, client, registered model name, champion version, its tags)."""
    config = load_config(REPO / "configs/demo.yaml", overrides)
    use_tracking_uri(tracking_uri(config))
    client = MlflowClient()
    name = config.mlflow.registered_model
    champion = alias_version(client, name, CHAMPION)
    assert champion is not None
    return config, client, name, champion, client.get_model_version(name, champion).tags


def pretrained_uri(first) -> str:
    """The version the first run pretrained: what its fine-tuned models must be built on."""
    return f"models:/{first['pretrain'].model_name}/{first['pretrain'].model_version}"


def test_run_trains_a_champion_that_learned_objects(demo_run):
    root, overrides, first = demo_run
    config, client, name, champion, tags = champion_of(overrides)
    trained = float(tags["eval.zero_shot_object_top1"])
    chance = float(tags["eval.zero_shot_object_chance"])
    assert float(tags["eval.zero_shot_items"]) >= 4

    # The same model untrained, on the same held-out items, is the baseline to beat.
    assert int(first["pretrain"].model_version) == champion  # the first run trained the champion
    version_meta = client.get_model_version(name, champion)
    assert version_meta.tags["promotion.decision"] == "promoted"
    model, vocab, info = load_registered_model(f"models:/{name}/{champion}")
    # Every labelled video (the last of each demo class, never trained on) is scored.
    labelled = read_tokens(evalset_root(config), info["codebook_version"], info["tokenizer_version"])
    items, unscored = zero_shot_items(read_labels(config.evaluate.labels, config), labelled)
    assert not unscored and len(items) == float(tags["eval.zero_shot_items"]) == 12
    tokenizer = TextTokenizer.load(Layout(config.output).tokenizer(info["tokenizer_version"]))
    untrained = build_model(config.model.size, vocab, config.model.max_seq_len, seed=123).eval()
    classes = label_classes(config)
    baseline, _ = zero_shot(untrained, vocab, tokenizer.encode, items, config.model.max_seq_len, *classes)
    again, _ = zero_shot(model.eval(), vocab, tokenizer.encode, items, config.model.max_seq_len, *classes)

    assert again["zero_shot_object_top1"] == pytest.approx(trained, abs=1e-6)
    assert trained >= 3 * chance, f"zero-shot object accuracy {trained:.2f} < 3x chance {chance:.2f}"
    assert trained > baseline["zero_shot_object_top1"]


# Issue 13's goals on held-out videos, at or a little under what configs/demo.yaml reaches in
# every seed tried (README, "Results"), so that noise does not fail them. Alignment and retrieval
# are judged on the held-out texts that name a labelled verb or object: against another video's
# filler ("hello everyone."), a filler can be told apart only by its clip length.
GOALS = {
    "zero_shot_object_top1": ("at least 3x chance", lambda t: 3 * t["zero_shot_object_chance"]),
    # The goal itself: over 12 seeds the demo recipe named 0.67-1.00 of the held-out verbs (mean
    # 0.86; README, "Results"), and one wrong verb of 12 costs 0.08. (8 of 12 is exactly 2x chance.)
    "zero_shot_verb_top1": ("at least 2x chance", lambda t: 2 * t["zero_shot_verb_chance"] - 1e-9),
    # The hold-out hashes each video's path under `source`, so this test holds out the same
    # videos as ./scripts/demo.sh on data/demo: 0.949 there (R@1 0.267, 7.8x chance). Before,
    # it hashed the whole URI and every tmp path drew other videos (0.86-0.95, R@1 0.10-0.20).
    "alignment_auc_named": ("at least 0.88", lambda t: 0.88),
    "retrieval_recall_at_1_named": (
        "at least 5x chance",
        lambda t: 5 * t["retrieval_chance_recall_at_1_named"],
    ),
}


def test_the_champion_aligns_and_retrieves_held_out_videos(demo_run):
    _, overrides, _ = demo_run
    config, client, _, _, version_tags = champion_of(overrides)
    tags = {
        k.removeprefix("eval."): float(v)
        for k, v in version_tags.items()
        if k.startswith("eval.") and k != "eval.run_id"
    }
    failed = [
        f"{metric} {tags[metric]:.3f} not {words} ({bound(tags):.3f})"
        for metric, (words, bound) in GOALS.items()
        if not tags[metric] >= bound(tags)
    ]
    # median rank at most 1/5 of the candidates
    if not tags["retrieval_median_rank_named"] <= tags["retrieval_candidates_named"] / 5:
        failed.append(
            f"median rank {tags['retrieval_median_rank_named']} of {tags['retrieval_candidates_named']}"
        )
    assert not failed, "; ".join(failed)
    # promotion used the combined metric, and the evaluation run holds the plots
    assert tags[config.evaluate.combined_metric] > 0
    run_id = version_tags["eval.run_id"]
    # zero-shot asked in the demo narrations' own words (evaluation.narration_prefix)
    assert (
        client.get_run(run_id).data.tags["zero_shot_template"]
        == "now let me show you how to [MASK] the [MASK]"
    )
    assert version_tags["zero_shot_prefix"] == "now let me show you how to"  # what finetune-classify asks in
    plots = {Path(f.path).name for f in client.list_artifacts(run_id, "evaluation")}
    assert {"alignment_roc.png", "retrieval_ranks.png", "zero_shot_verbs.png"} <= plots


def test_run_fine_tunes_a_classifier_that_beats_zero_shot(demo_run):
    """The demo's classification table (12 "<verb> the <object>" classes, tested on the labelled
    videos): after fine-tuning, test top-1 at least the same champion's zero-shot accuracy,
    with a margin of one clip of 12. The demo champion names verb and object through the
    template (zero-shot 1.00), and configs/demo.yaml blends the head's scores with zero-shot's
    (`finetune.zero_shot_weight` 0.67): 1.00 in 32 of 32 runs over four champions (README,
    "Fine-tuning a classifier"); the head alone reached 1.00 in 19."""
    root, overrides, first = demo_run
    classifier = first["finetune-classify"]
    assert classifier.pretrained_uri == pretrained_uri(first)
    metrics = classifier.metrics
    assert metrics["test_clips"] == 12 and metrics["chance"] == pytest.approx(1 / 12)
    assert metrics["test_top1"] >= metrics["zero_shot_top1"] - 1 / 12 - 1e-9, metrics
    assert 0 <= metrics["head_top1"] <= 1  # the head alone, reported beside the blend
    assert metrics["test_top1"] >= 3 * metrics["chance"], metrics


# Issue 14 §5's caption goals on the demo's 12 held-out segments (VideoBERT + S3D CIDEr at least
# S3D-only's; 90% of captions name the right object), with a small margin under what
# configs/demo.yaml reached (README, "Fine-tuning a captioner": objects 1.00; CIDEr at least
# S3D-only's in 21 of 22 champion x seed runs at 300 steps, 0.94x in the other, all near
# CIDEr's ceiling of 10).
CAPTION_GOALS = {
    "test_object_named": ("at least 0.90", lambda m: 0.90),
    # One verb of 12 costs about 0.06x: the margin is one verb.
    "test_cider": ("at least 0.93x the S3D-only captioner's", lambda m: 0.93 * m["s3d_cider"]),
}


def test_run_fine_tunes_a_captioner_that_beats_s3d_alone(demo_run):
    _, _, first = demo_run
    captioner = first["finetune-caption"]
    assert captioner.pretrained_uri == pretrained_uri(first)
    metrics = captioner.metrics
    assert metrics["test_segments"] == 12, metrics
    failed = [
        f"{metric} {metrics[metric]:.3f} not {words} ({bound(metrics):.3f})"
        for metric, (words, bound) in CAPTION_GOALS.items()
        if not metrics[metric] >= bound(metrics)
    ]
    assert not failed, "; ".join(failed)


def test_show_prints_held_out_predictions_next_to_the_truth(demo_run, capsys):
    """`videobert show` (the end of ./scripts/demo.sh): the registered champions, loaded as a
    user would, label and caption a few held-out videos; each line has the truth beside it."""
    from pipelines import show

    _, overrides, _ = demo_run
    config = load_config(REPO / "configs/demo.yaml", overrides)
    shown = show.run(config)
    printed = capsys.readouterr().out
    assert len(shown) == config.demo.show_videos
    for video in shown:
        assert video.error is None, video
        assert video.true_label and video.predicted_label and video.true_caption and video.generated_caption
        assert f"truth: {video.true_label})" in printed and video.generated_caption in printed
    # Held-out means the classification table's test split: never pretrained or fine-tuned on.
    labelled = {
        str(Path(uri).resolve())
        for uri in read_labels(config.evaluate.labels, config)["source_uri"].to_pylist()
    }
    assert {video.video for video in shown} <= labelled
