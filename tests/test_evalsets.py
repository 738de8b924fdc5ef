"""Evaluation sets wherever they live (issue 12 §4): every labelled video is scored, none is
trained on, an unreadable one is named, and a rerun redoes nothing.

One tiny corpus through the real stages on the shared Ray cluster: extract -> fit-codebook ->
tokenize, an untrained `debug` model registered as the candidate, then `evaluate`. The labelled
set holds two videos under `source`, two in a separate local directory, one under an S3 prefix
(the moto server), a text file named .mp4 and an object that does not exist.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from pipelines import evaluate, extract, fit_codebook, tokenize
from tests import videos
from videobert import storage
from videobert.config import ExperimentConfig, load_config
from videobert.evaluation import evalset_root, plan_evalset
from videobert.model import JointVocab, build_model
from videobert.registry import log_and_register_model
from videobert.results import EvaluationResult, TokenizeResult
from videobert.tables import Layout, read_manifest, video_id
from videobert.text_tokenizer import TextTokenizer
from videobert.token_shards import read_tokens
from videobert.tracking import setup_experiment, start_or_resume_run

NARRATION = b"WEBVTT\n\n00:00:00.000 --> 00:00:03.500\nnow let me show you how to slide the %s.\n"


def _video(path: Path | str, seed: int, shape: str, s3_data: dict[str, bytes] | None = None) -> str:
    """A 4 s video of `shape` with its narration; an s3:// path is uploaded. Returns its URI."""
    local = Path(f"/tmp/evalsets-{uuid.uuid4().hex}.mp4") if str(path).startswith("s3://") else Path(path)
    videos.make_object_video(local, seed=seed, num_frames=32, height=64, width=64, shape=shape)
    narration = NARRATION % shape.encode()
    if str(path).startswith("s3://"):
        storage.write_bytes(str(path), local.read_bytes())
        storage.write_bytes(str(path)[:-4] + ".vtt", narration)
        local.unlink()
        return str(path)
    local.with_suffix(".vtt").write_bytes(narration)
    return str(local.resolve())


@dataclass
class Evaluated:
    config: ExperimentConfig
    tokens: TokenizeResult
    first: EvaluationResult
    scored: dict[str, str]
    """source_uri -> object, for each labelled video that can be scored."""
    unreadable: dict[str, str]
    """source_uri -> the reason the test expects to see (a fragment)."""


@pytest.fixture(scope="module")
def evaluated(ray_cluster, s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Evaluated:
    import boto3
    import yaml

    root = tmp_path_factory.mktemp("evalsets")
    bucket = f"evalsets-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    source, elsewhere = root / "videos", root / "validation"
    for i, shape in enumerate(["circle", "square"]):
        _video(source / f"train{i}.mp4", 10 + i, shape)
    scored = {
        _video(source / "in0.mp4", 20, "circle"): "circle",
        _video(source / "in1.mp4", 21, "square"): "square",
        _video(elsewhere / "out0.mp4", 30, "circle"): "circle",
        _video(elsewhere / "out1.mp4", 31, "square"): "square",
        _video(f"s3://{bucket}/validation/out2.mp4", 32, "circle"): "circle",
    }
    unreadable = {
        str(videos.make_text_file(elsewhere / "notes.mp4").resolve()): "decode",
        str((elsewhere / "gone.mp4").resolve()): "no such object",
    }
    labels = root / "labels.csv"
    lines = ["source_uri,verb,object"]
    lines += [f"{uri},slide,{obj}" for uri, obj in scored.items()]
    lines += [f"{uri},slide,circle" for uri in unreadable]
    labels.write_text("\n".join(lines) + "\n")
    settings = {
        "source": str(source),
        "output": str(root / "out"),
        "decode": {"fps": 8, "clip_frames": 8, "size": 64},
        "encoder": {"weights": "none", "clips_per_batch": 4},
        # an error row stays until its video changes, so a rerun has nothing to decode
        "extract": {"feature_actors": 1, "retry_errors": False},
        "codebook": {"k": 2, "depth": 2, "sample_size": 100, "iterations": 10, "gallery_words": 2},
        "text": {"vocab_size": 60},
        "tokenize": {"segment_tokens": 2},
        "model": {"size": "debug", "max_seq_len": 64},
        "mlflow": {"tracking_uri": f"sqlite:///{root}/mlflow.db"},
        "evaluate": {"labels": str(labels), "holdout_fraction": 0.5},
    }
    (root / "experiment.yaml").write_text(yaml.safe_dump(settings))
    config = load_config(root / "experiment.yaml")
    extract.run(config)
    tokens = tokenize.run(config, fit_codebook.run(config))

    # An untrained model is enough: the test is about which videos are scored, not how well.
    vocab = JointVocab(TextTokenizer.load(tokens.tokenizer.uri).vocab, tokens.codebook.vocab_size)
    model = build_model("debug", vocab, max_positions=config.model.max_seq_len, seed=0)
    metadata = {
        "codebook_version": tokens.codebook.version,
        "tokenizer_version": tokens.tokenizer.version,
        "codebook_uri": tokens.codebook.uri,
        "tokenizer_uri": tokens.tokenizer.uri,
        "max_seq_len": config.model.max_seq_len,
    }
    setup_experiment(config)
    run_id, _ = start_or_resume_run(config, "evalsets-untrained")
    log_and_register_model(run_id, model, vocab, metadata, config, config.mlflow.registered_model)
    first = evaluate.run(config)
    return Evaluated(config, tokens, first, scored, unreadable)


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
