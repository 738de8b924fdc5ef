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
import pandas as pd
import pytest

from pipelines import finetune_classify
from pipelines.common import EXIT_CONFIG
from tests.labelled_world import Evaluated
from videobert.classification import TEMPLATE, TEST, TRAIN, holdout_split, read_classification_table
from videobert.classifier import LINEAGE_TAG
from videobert.config import ConfigError, FinetuneConfig, load_config
from videobert.evaluation import evalset_root, holdout_key
from videobert.registry import CANDIDATE, CHAMPION, alias_version
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
    assert classifier.head_template == TEMPLATE
    assert classifier.head.linear.in_features == 2 * classifier.model.config.hidden
    notes = next(u for u, why in evaluated.unreadable.items() if why == "decode")
    video = str(Path(config.source) / "in1.mp4")
    out = model.predict(pd.DataFrame({"video": [video, notes], "start_s": [0.0, None], "end_s": [3.0, None]}))
    assert list(out.columns) == ["label", "scores", "error"] and len(out) == 2
    assert out["label"][0] in ("circle", "square") and out["error"][0] is None
    assert len(out["scores"][0]) == 2 and sum(out["scores"][0]) == pytest.approx(1.0)
    assert out["label"][1] is None and out["error"][1].startswith("decode:")


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
