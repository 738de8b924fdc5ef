"""`videobert finetune-classify`: a classifier on a registered pretrained model, end to end.

The world is test_evalsets' (tests/labelled_world.py, built once per session): videos of circles
and squares under `source` (extracted), in another directory and on S3 (not extracted), a text
file named .mp4, and an untrained `debug` model registered as `videobert@candidate`. The labels
table names them with `label` circle / square, a window of one, and the unreadable file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pipelines import finetune_classify
from pipelines.common import EXIT_CONFIG
from tests.labelled_world import Evaluated
from videobert.classification import (
    TEMPLATE,
    TEST,
    TRAIN,
    LabelledClip,
    blend_with_zero_shot,
    holdout_split,
    read_classification_table,
    zero_shot_class_scores,
)
from videobert.classifier import LINEAGE_TAG
from videobert.config import ConfigError, FinetuneConfig, load_config
from videobert.evaluation import evalset_root, holdout_key
from videobert.registry import CANDIDATE, CHAMPION, VideoBertPyfunc, alias_version
from videobert.tables import read_manifest
from videobert.tracking import use_tracking_uri

CLASSIFIER = "shapes-classifier"


@pytest.fixture(scope="module")
def finetuned(evaluated: Evaluated, tmp_path_factory: pytest.TempPathFactory):
    config = evaluated.config
    source = Path(config.source)
    circle, square = (
        [u for u, o in evaluated.scored.items() if o == shape] for shape in ("circle", "square")
    )
    notes = next(u for u, why in evaluated.unreadable.items() if why == "decode")
    rows = ["source_uri,label,split,start_s,end_s,verb,object"]
    rows += [
        f"{source / 'train0.mp4'},circle,train,,,slide,circle",
        f"{source / 'train1.mp4'},square,train,,,slide,square",
    ]
    rows += [f"{u},circle,train,,,slide,circle" for u in circle if "/in" not in u]  # out0, out2 (S3)
    rows += [f"{u},square,train,,,slide,square" for u in square if "/in" not in u]  # out1
    rows += [f"{u},{o},test,,,slide,{o}" for u, o in evaluated.scored.items() if "/in" in u]  # in0, in1
    rows += [f"{source / 'in0.mp4'},circle,test,0,2,slide,circle", f"{notes},circle,train,,,slide,circle"]
    labels = tmp_path_factory.mktemp("classes") / "classes.csv"
    labels.write_text("\n".join(rows) + "\n")
    settings = FinetuneConfig(
        labels=str(labels),
        mode="full",
        model_uri=f"models:/{evaluated.first.model_name}@{CANDIDATE}",
        classifier_name=CLASSIFIER,
        steps=10,
        batch_size=4,
        encoder_lr=1e-3,
        log_every=5,
    )
    config = dataclasses.replace(config, finetune=settings)
    return config, finetune_classify.run(config)


def test_stage_registers_a_classifier_with_its_lineage_and_metrics(finetuned, evaluated: Evaluated) -> None:
    config, result = finetuned
    use_tracking_uri(config.mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    pretrained = f"models:/{evaluated.first.model_name}/{evaluated.first.version}"
    assert (result.version, result.pretrained_uri, result.skipped) == ("1", pretrained, False)
    assert (
        str(alias_version(client, CLASSIFIER, CANDIDATE))
        == str(alias_version(client, CLASSIFIER, CHAMPION))
        == "1"
    )
    tags = client.get_model_version(CLASSIFIER, "1").tags
    assert tags[LINEAGE_TAG] == pretrained and tags["promotion.decision"] == "promoted"
    assert float(tags["eval.test_clips"]) == 3 and float(tags["eval.train_clips"]) == 5  # notes.mp4 left out
    assert 0 <= float(tags["eval.test_top1"]) <= 1 and float(tags["eval.test_top5"]) == 1  # 2 classes
    assert "zero_shot_top1" in result.metrics and "zero_shot_object_top1" in result.metrics
    # the videos outside `source` were extracted with extract's code into the table's own tables
    rows = {
        r["source_uri"]: r["status"]
        for r in read_manifest(evalset_root(config, config.finetune.labels)).to_pylist()
    }
    assert sum(s == "ok" for s in rows.values()) == 7 and any(u.startswith("s3://") for u in rows)
    assert any("notes.mp4" in u and "decode" in why for u, why in result.unreadable.items())
    run = client.get_run(result.run_id)
    assert run.data.tags["stage"] == "finetune-classify" and {"test_top1", "zero_shot_top1"} <= set(
        run.data.metrics
    )
    assert [m.step for m in client.get_metric_history(result.run_id, "loss")] == [5, 10]  # per step, rank 0
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "classification")}
    assert "classification/classifier.png" in artifacts and "classification/report.md" in artifacts
    assert "shapes-classifier v1" in client.get_model_version(CLASSIFIER, "1").description


def test_rerun_trains_nothing(finetuned) -> None:
    config, first = finetuned
    use_tracking_uri(config.mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    runs = len(client.search_runs([client.get_run(first.run_id).info.experiment_id]))
    again = finetune_classify.run(config)
    assert again.skipped and again.version == first.version
    assert len(client.search_model_versions(f"name='{CLASSIFIER}'")) == 1
    assert len(client.search_runs([client.get_run(first.run_id).info.experiment_id])) == runs


def test_registered_classifier_predicts_labels_and_error_rows(finetuned, evaluated: Evaluated) -> None:
    config, _ = finetuned
    use_tracking_uri(config.mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{CLASSIFIER}@{CHAMPION}")
    # template_features (the default): the head takes the pooled embedding and the template's
    # mean [MASK] output, and the registered model says which template
    classifier = model.unwrap_python_model()
    assert (classifier.loaded.pooled, classifier.loaded.template) == (True, TEMPLATE)
    assert classifier.loaded.head.linear.in_features == 2 * classifier.model.config.hidden
    notes = next(u for u, why in evaluated.unreadable.items() if why == "decode")
    video = str(Path(config.source) / "in1.mp4")
    out = model.predict(pd.DataFrame({"video": [video, notes], "start_s": [0.0, None], "end_s": [3.0, None]}))
    assert list(out.columns) == ["label", "scores", "error"] and len(out) == 2
    assert out["label"][0] in ("circle", "square") and out["error"][0] is None
    assert len(out["scores"][0]) == 2 and sum(out["scores"][0]) == pytest.approx(1.0)
    assert out["label"][1] is None and out["error"][1].startswith("decode:")


def test_head_on_the_template_alone_in_the_evaluations_words(finetuned, evaluated: Evaluated) -> None:
    """`finetune.pooled_features: false` (what the demo trains): the head takes the template's
    [MASK] outputs only, in training and in the registered model's `predict`, which computes
    them from the raw video as training did. The template asks in the words the pretrained
    version's own evaluation used (its `zero_shot_prefix` tag), and so does zero-shot."""
    from videobert.classification import template_outputs
    from videobert.embedding import embedding_max_len
    from videobert.evaluation import PREFIX_TAG

    config, first = finetuned
    use_tracking_uri(config.mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    pretrained = evaluated.first
    # evaluate tagged the version with the words its zero-shot asked in
    assert client.get_model_version(pretrained.model_name, pretrained.version).tags[PREFIX_TAG] == (
        "now let me show you how to"
    )
    settings = dataclasses.replace(config.finetune, mode="linear_probe", pooled_features=False, steps=5)
    client.set_model_version_tag(pretrained.model_name, pretrained.version, PREFIX_TAG, "next we")
    try:
        result = finetune_classify.run(dataclasses.replace(config, finetune=settings))
    finally:
        client.set_model_version_tag(
            pretrained.model_name, pretrained.version, PREFIX_TAG, "now let me show you how to"
        )
    assert not result.skipped and int(result.version) == int(first.version) + 1
    template = "next we [MASK] the [MASK]"
    assert client.get_model_version(CLASSIFIER, result.version).tags[PREFIX_TAG] == "next we"
    report = client.download_artifacts(result.run_id, "classification/report.md")
    assert template in Path(report).read_text()
    model = mlflow.pyfunc.load_model(f"models:/{CLASSIFIER}/{result.version}")
    classifier = model.unwrap_python_model()
    loaded = classifier.loaded
    assert (loaded.pooled, loaded.template) == (False, template)
    assert loaded.head.linear.in_features == classifier.model.config.hidden
    video = str(Path(config.source) / "in1.mp4")
    out = model.predict(pd.DataFrame({"video": [video]}))
    assert out["error"][0] is None and out["label"][0] in loaded.classes
    # the same scores from the template's outputs over the video's own visual words
    embedded = VideoBertPyfunc.predict(classifier, None, pd.DataFrame({"video": [video]}))
    masked = template_outputs(
        classifier.model.eval(),
        classifier.vocab,
        classifier.template_ids(template),
        [np.asarray(embedded["visual_words"][0], np.int64)],
        embedding_max_len(classifier.model, classifier.metadata),
    )
    with torch.no_grad():
        expected = torch.softmax(loaded.head(masked), -1)[0].tolist()
    assert list(out["scores"][0]) == pytest.approx(expected, abs=1e-5)


def test_blend_with_zero_shot_weighs_the_two_log_probabilities() -> None:
    head, prior = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[-3.0, -0.5, -1.0]])
    assert blend_with_zero_shot(head, prior, 0.0) == pytest.approx(torch.softmax(head, -1))
    assert blend_with_zero_shot(head, prior, 1.0) == pytest.approx(torch.softmax(prior, -1))
    halfway = torch.softmax((torch.log_softmax(head, -1) + torch.log_softmax(prior, -1)) / 2, -1)
    assert blend_with_zero_shot(head, prior, 0.5) == pytest.approx(halfway)


def test_zero_shot_blend_in_training_and_predict(finetuned, evaluated: Evaluated) -> None:
    """`finetune.zero_shot_weight`: the classifier's scores blend the head's with zero-shot's.
    At weight 1 they are zero-shot's: the test top-1 is zero-shot's, and the registered model's
    `predict` computes the same zero-shot scores from the raw video as training did."""
    config, _ = finetuned
    use_tracking_uri(config.mlflow.tracking_uri)
    settings = dataclasses.replace(config.finetune, mode="linear_probe", zero_shot_weight=1.0, steps=5)
    result = finetune_classify.run(dataclasses.replace(config, finetune=settings))
    assert result.metrics["test_top1"] == result.metrics["zero_shot_top1"]
    assert "head_top1" in result.metrics
    model = mlflow.pyfunc.load_model(f"models:/{CLASSIFIER}/{result.version}")
    classifier = model.unwrap_python_model()
    assert classifier.loaded.zero_shot == {
        "weight": 1.0,
        "prefix": "now let me show you how to",
        "pairs": {"circle": ["slide", "circle"], "square": ["slide", "square"]},
    }
    video = str(Path(config.source) / "in1.mp4")
    out = model.predict(pd.DataFrame({"video": [video]}))
    embedded = VideoBertPyfunc.predict(classifier, None, pd.DataFrame({"video": [video]}))
    clip = LabelledClip(row=0, source_uri=video, label="square", split=TEST, verb="slide", object="square")
    pairs = {c: tuple(p) for c, p in classifier.loaded.zero_shot["pairs"].items()}
    _, scores = zero_shot_class_scores(
        classifier.model.eval(),
        classifier.vocab,
        classifier.encode_text,
        [clip],
        [np.asarray(embedded["visual_words"][0], np.int64)],
        classifier.loaded.classes,
        pairs,
        int(classifier.metadata["max_seq_len"]),
    )
    assert list(out["scores"][0]) == pytest.approx(
        torch.softmax(torch.as_tensor(scores[0]), -1).tolist(), abs=1e-5
    )

    # a table of labels alone: zero-shot cannot name its classes, so no blend (blend_weight)
    labels_only = Path(config.finetune.labels).with_name("labels_only.csv")
    pd.read_csv(config.finetune.labels).drop(columns=["verb", "object"]).to_csv(labels_only, index=False)
    settings = dataclasses.replace(settings, labels=str(labels_only))
    alone = finetune_classify.run(dataclasses.replace(config, finetune=settings))
    assert alone.metrics["test_top1"] == alone.metrics["head_top1"]
    unblended = mlflow.pyfunc.load_model(f"models:/{CLASSIFIER}/{alone.version}").unwrap_python_model()
    assert unblended.loaded.zero_shot is None


def test_split_by_column_or_by_video_hash(tmp_path: Path) -> None:
    table = tmp_path / "classes.csv"
    uris = [f"/videos/v{i}.mp4" for i in range(200)]
    table.write_text("source_uri,label\n" + "".join(f"{u},a\n{u},b\n" for u in uris))
    config = load_config(None, [f"output={tmp_path}", "source=/videos", "finetune.test_fraction=0.25"])
    clips = read_classification_table(str(table), config)
    by_video: dict[str, set[str]] = {}
    for clip in clips:
        by_video.setdefault(clip.source_uri, set()).add(clip.split)
    assert all(len(splits) == 1 for splits in by_video.values())  # both rows of a video on one side
    held = sum(splits == {TEST} for splits in by_video.values())
    assert 30 <= held <= 70, held  # about a quarter of 200 videos
    # The split hashes the path under the corpus root: the same wherever the corpus lives.
    moved = [u.replace("/videos/", "s3://bucket/corpus/") for u in uris]
    assert [holdout_split(u, 0.25, "/videos") for u in uris] == [
        holdout_split(u, 0.25, "s3://bucket/corpus/") for u in moved
    ]
    assert holdout_key("/videos/a/v1.mp4", "/videos") == "a/v1.mp4"
    assert holdout_key("/elsewhere/v1.mp4", "/videos") == "/elsewhere/v1.mp4"
    table.write_text("source_uri,label,split\n/videos/v0.mp4,a,Test\n/videos/v0.mp4,b,train\n")
    assert [c.split for c in read_classification_table(str(table), config)] == [TEST, TRAIN]


@pytest.mark.parametrize(
    "text, column",
    [
        ("source_uri,split\n/v/a.mp4,train\n", "label"),
        ("label,split\na,train\n", "source_uri"),
        ("source_uri,label,split\n/v/a.mp4,a,train\n/v/b.mp4,b,validation\n", "split"),
        ("source_uri,label,split,start_s,end_s\n/v/a.mp4,a,train,3,2\n/v/b.mp4,a,test,,\n", "start_s"),
        ("source_uri,label,split\n/v/a.mp4,a,train\n/v/b.mp4,b,train\n", "no test row"),
    ],
)
def test_bad_table_is_a_config_error_naming_the_column(
    tmp_path: Path, text: str, column: str, capsys
) -> None:
    table = tmp_path / "classes.csv"
    table.write_text(text)
    config = load_config(None, [f"output={tmp_path / 'out'}", f"finetune.labels={table}"])
    with pytest.raises(ConfigError, match=column):
        read_classification_table(str(table), config)
    assert (
        finetune_classify.main([f"--set=output={tmp_path / 'out'}", f"--set=finetune.labels={table}"])
        == EXIT_CONFIG
    )
    assert column in capsys.readouterr().err
    with pytest.raises(ConfigError, match="finetune.mode"):
        load_config(None, ["finetune.mode=probe"])
