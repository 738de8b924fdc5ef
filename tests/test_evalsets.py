"""Evaluation sets wherever they live (issue 12 §4): every labelled video is scored, none is
trained on, an unreadable one is named, and a rerun redoes nothing.

The world: tests/labelled_world.py (conftest's session fixture `evaluated`): one tiny corpus
through the real stages on the shared Ray cluster, an untrained `debug` model registered as the
candidate, then `evaluate`. The labelled set holds two videos under `source`, two in a separate
local directory, one under an S3 prefix (the moto server), a text file named .mp4 and an object
that does not exist.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow

from pipelines import evaluate, tokenize
from tests.labelled_world import Evaluated
from videobert import storage
from videobert.evaluation import evalset_root, plan_evalset
from videobert.tables import Layout, read_manifest, video_id
from videobert.token_shards import read_tokens


def test_every_labelled_video_is_scored_wherever_it_lives(evaluated: Evaluated) -> None:
    config, first = evaluated.config, evaluated.first
    # in source, in another directory, under an S3 prefix: all five, not only the hash hold-out
    assert first.metrics["zero_shot_items"] == len(evaluated.scored) == 5
    assert config.evaluate.metric in first.metrics
    client = mlflow.MlflowClient()
    tags = client.get_model_version(first.model_name, first.version).tags
    assert float(tags["eval.zero_shot_items"]) == 5
    # the labelled videos outside `source` have their own tables, made by extract's code
    evalset = read_manifest(evalset_root(config))
    ok = {r["source_uri"] for r in evalset.to_pylist() if r["status"] == "ok"}
    assert ok == set(evaluated.scored)
    assert all(storage.exists(Layout(evalset_root(config)).features_file(video_id(u))) for u in ok)


def test_labelled_videos_are_never_in_the_pretraining_shards(evaluated: Evaluated) -> None:
    config, tokens = evaluated.config, evaluated.tokens
    extracted = {r["source_uri"]: r for r in read_manifest(config.output).to_pylist()}
    inside = [uri for uri in evaluated.scored if uri in extracted]
    assert len(inside) == 2 and all(extracted[uri]["status"] == "ok" for uri in inside)
    trained_on = set(
        read_tokens(config.output, tokens.codebook.version, tokens.tokenizer.version)["video_id"]
    )
    assert len(trained_on) == 2  # the two training videos
    assert not trained_on & {video_id(uri) for uri in evaluated.scored}
    # nothing under `output` that pretrain lists holds the evalset's tables
    assert not evalset_root(config).startswith(Layout(config.output).tokens_root)
    # extract's features of the labelled videos under `source` were copied, not decoded again
    evalset = {r["source_uri"]: r for r in read_manifest(evalset_root(config)).to_pylist()}
    assert all(evalset[uri]["run_id"] == extracted[uri]["run_id"] for uri in inside)


def test_unreadable_labelled_video_is_named_and_the_rest_scored(evaluated: Evaluated) -> None:
    first = evaluated.first
    assert set(first.unreadable) == set(evaluated.unreadable)
    for uri, fragment in evaluated.unreadable.items():
        assert fragment in first.unreadable[uri], first.unreadable[uri]
    client = mlflow.MlflowClient()
    run = client.get_run(first.run_id)
    assert run.data.tags[evaluate.UNREADABLE_TAG] == "2"
    path = client.download_artifacts(first.run_id, f"evaluation/{evaluate.UNREADABLE_TAG}.json")
    assert set(json.loads(Path(path).read_text())) == set(evaluated.unreadable)


def test_rerun_does_not_redo_extracted_labelled_videos(evaluated: Evaluated) -> None:
    """evaluate's preparation again (the scoring is not re-run: that is not the point here)."""
    from videobert.features import encoder_id
    from videobert.registry import resolve_model_version

    config, first = evaluated.config, evaluated.first
    layout = Layout(evalset_root(config))
    files = storage.list_files(layout.features, suffix=".parquet")
    before = {f: os.stat(f).st_mtime_ns for f in files}
    rows_before = read_manifest(layout.output).to_pylist()
    plan = plan_evalset(config, encoder_id(config.encoder))
    assert len(plan.videos) == 6 and not plan.adopt and not plan.todo  # notes.mp4: a kept error
    unreadable = evaluate.prepare_labelled(
        config, resolve_model_version(f"models:/{first.model_name}/{first.version}")
    )
    assert set(unreadable) == set(evaluated.unreadable)
    assert {f: os.stat(f).st_mtime_ns for f in files} == before and len(files) == 5
    assert read_manifest(layout.output).to_pylist() == rows_before


def test_a_video_labelled_later_leaves_the_pretraining_shards(evaluated: Evaluated) -> None:
    """Runs last: it labels a training video for a moment, and tokenize removes its shard."""
    config, tokens = evaluated.config, evaluated.tokens
    labels = Path(str(config.evaluate.labels))
    before = labels.read_text()
    newly = str((Path(config.source) / "train0.mp4").resolve())
    try:
        labels.write_text(before + f"{newly},slide,circle\n")
        again = tokenize.run(config)
        assert again.videos_removed == 1 and again.videos_tokenized == 0
        shards = read_tokens(config.output, tokens.codebook.version, tokens.tokenizer.version)
        assert video_id(newly) not in set(shards["video_id"].to_pylist())
        assert len(again.files) == len(tokens.files) - 1
    finally:
        labels.write_text(before)
