"""No secret is written anywhere (issue 12 §5): a canary in the environment and in a config.

The canary is the S3 secret key (the local S3 server takes any credentials, so the whole run
reads its videos with it) and the MLflow password, in the environment of a real
`python -m pipelines.run` on a small corpus, with a private local Ray instance. First, a config
(an override) and a tracking URI carrying the canary are refused with exit code 2, without
echoing it. Then, after the full run (extract through promote), the canary appears nowhere:
not under `output` (tables, checkpoints, the MLflow SQLite store and its artifacts), not in the
working directory, not in Ray's session directory (its logs and runtime environments), and not
in the run's stdout or stderr.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from videobert.demo_corpus import DemoSpec, generate_corpus

REPO = Path(__file__).resolve().parent.parent
CANARY = f"canary{uuid.uuid4().hex}"
SETTINGS = {
    "name": "secrets",
    "decode": {"fps": 8, "clip_frames": 8, "size": 64, "max_clips": 6},
    "encoder": {"weights": "none", "clips_per_batch": 8},
    "codebook": {"k": 4, "depth": 2, "iterations": 5, "gallery_words": 4},
    "text": {"vocab_size": 200},
    "tokenize": {"segment_tokens": 8},
    "model": {"size": "debug", "max_seq_len": 64},
    "train": {
        "steps": 4,
        "workers": 1,
        "zero_stage": 2,
        "batch_size": 16,
        "checkpoint_every": 2,
        "log_every": 2,
        "precision": "fp32",
    },
}


@pytest.fixture
def root() -> Iterator[Path]:
    """A short directory of its own: Ray's socket paths under RAY_TMPDIR must stay short."""
    path = Path(tempfile.mkdtemp(prefix="vbsec", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_pipeline(
    config: Path, env: dict[str, str], cwd: Path, *overrides: str
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pipelines.run", "--config", str(config)]
    for override in overrides:
        command += ["--set", override]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def files_holding(directory: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return [str(path) for path in directory.rglob("*") if path.is_file() and needle in path.read_bytes()]


def test_canary_secret_is_refused_in_a_config_and_written_nowhere(s3_bucket: str, root: Path) -> None:
    source = f"{s3_bucket}/videos"
    labels = root / "labels.csv"
    generate_corpus(
        source, DemoSpec(objects=2, actions=2, videos_per_class=2, seconds=3.0), labels_uri=str(labels)
    )
    config = root / "experiment.yaml"
    output = root / "out"
    values = {**SETTINGS, "source": source, "output": str(output), "evaluate": {"labels": str(labels)}}
    config.write_text(yaml.safe_dump(values))
    work = root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        RAY_TMPDIR=str(root / "ray"),
        AWS_ACCESS_KEY_ID="videobert-test",
        AWS_SECRET_ACCESS_KEY=f"{CANARY}-aws",
        MLFLOW_TRACKING_USERNAME="videobert",
        MLFLOW_TRACKING_PASSWORD=f"{CANARY}-mlflow",
    )
    (root / "ray").mkdir()
    captured = []

    # In a config or in the tracking URI: refused before anything runs, and never echoed.
    refused = run_pipeline(config, env, work, f"s3.endpoint_url=http://videobert:{CANARY}@127.0.0.1:9")
    captured.append(refused.stdout + refused.stderr)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "s3.endpoint_url" in refused.stderr and "AWS_SECRET_ACCESS_KEY" in refused.stderr
    in_uri = {**env, "MLFLOW_TRACKING_URI": f"http://videobert:{CANARY}@127.0.0.1:9"}
    refused = run_pipeline(config, in_uri, work)
    captured.append(refused.stdout + refused.stderr)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "MLFLOW_TRACKING_URI" in refused.stderr and "MLFLOW_TRACKING_PASSWORD" in refused.stderr
    assert not output.exists()

    # The whole pipeline with the canary in its environment.
    done = run_pipeline(config, env, work)
    captured.append(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-5000:]
    assert "model:         models:/videobert@champion (v1)" in done.stdout
    assert (output / "mlflow.db").is_file() and (output / "mlartifacts").is_dir()
    assert list((root / "ray").rglob("*.log")), "no Ray session logs to search"

    runs = ["refused override", "refused tracking URI", "full run"]
    assert not [run for run, text in zip(runs, captured, strict=True) if CANARY in text]
    leaks = files_holding(root, CANARY)  # output, MLflow store, working dir, Ray's session dir
    assert not leaks, f"the canary was written to {leaks}"
