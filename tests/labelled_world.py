"""A tiny labelled world, shared by tests/test_evalsets.py and tests/test_finetune_classify.py
(conftest's session fixture `evaluated`, built once per session).

One tiny corpus through the real stages on the shared Ray cluster: extract -> fit-codebook ->
tokenize, an untrained `debug` model registered as the candidate, then `evaluate`. The labelled
set holds two videos under `source` (and two more there to train on), two in a separate local
directory, one under an S3 prefix (the moto server), a text file named .mp4 and an object that
does not exist.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines import evaluate, extract, fit_codebook, tokenize
from tests import videos
from videobert import storage
from videobert.config import ExperimentConfig, load_config
from videobert.model import JointVocab, build_model
from videobert.registry import log_and_register_model
from videobert.results import EvaluationResult, TokenizeResult
from videobert.text_tokenizer import TextTokenizer
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


def build_evaluated(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Evaluated:
    """The world of the module doc; conftest's session fixture `evaluated` builds it once."""
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
