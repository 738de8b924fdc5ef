"""Reliability of `videobert run` under real faults (issue 5, section 6).

One small demo corpus, one undisturbed `run` as the reference. Then:
- a decode worker is SIGKILLed while extract runs: Ray retries its task and the outputs equal
  the undisturbed run's;
- a `python -m pipelines.run` process is SIGKILLed in extract, in tokenize, in pretrain (after
  a checkpoint) and in evaluate, rerun after each kill, and finally rerun to the end: the data
  tables equal the undisturbed run's, pretraining resumed from its checkpoint instead of
  starting over, and the registry holds exactly one evaluated champion, as after a clean run.

Model weights are not compared bit for bit: a resumed run draws its remaining batches from
another seed (see pipelines/pretrain.py), so only the shape of the result is compared there.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from mlflow import MlflowClient

from pipelines import extract
from pipelines import run as run_stage
from tests.processes import killing
from tests.test_extract import assert_same_state, files_state
from videobert.codebook import HierarchicalCodebook, list_codebooks
from videobert.config import load_config
from videobert.demo_corpus import DemoSpec, generate_corpus
from videobert.registry import CANDIDATE, CHAMPION, alias_version
from videobert.tables import Layout, read_manifest
from videobert.text_tokenizer import list_tokenizers
from videobert.token_shards import read_tokens
from videobert.tracking import setup_experiment, tracking_uri, use_tracking_uri

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {
    "name": "faults",
    "decode": {"fps": 8, "clip_frames": 8, "size": 64},
    "encoder": {"weights": "none", "clips_per_batch": 8},
    "extract": {"manifest_flush_every": 1},
    "codebook": {"k": 4, "depth": 2, "iterations": 10, "gallery_words": 4},
    "text": {"vocab_size": 200},
    "tokenize": {"segment_tokens": 8},
    "model": {"size": "debug", "max_seq_len": 64},
    "train": {
        "steps": 8,
        "workers": 2,
        "zero_stage": 2,
        "batch_size": 16,
        "lr": 0.001,
        "warmup_steps": 2,
        "checkpoint_every": 2,
        "log_every": 2,
        "precision": "fp32",
    },
    "evaluate": {"holdout_fraction": 0.25},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    spec = DemoSpec(objects=2, actions=2, videos_per_class=2, seconds=4.0)
    generate_corpus(str(root / "videos"), spec, labels_uri=str(root / "labels.csv"))
    return root


def write_config(root: Path, output: str) -> Path:
    values = {
        **SETTINGS,
        "source": str(root / "videos"),
        "output": str(root / output),
        "evaluate": {**SETTINGS["evaluate"], "labels": str(root / "labels.csv")},
    }
    path = root / f"{output}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def undisturbed(ray_cluster, corpus: Path) -> str:
    config = load_config(write_config(corpus, "undisturbed"))
    run_stage.run(config)
    return config.output


def test_decode_worker_killed_midway_is_retried(ray_cluster, corpus: Path, undisturbed: str) -> None:
    config = load_config(write_config(corpus, "decode-killed"))
    with killing("decode_video") as killed:  # a real worker death, mid-task
        summary = extract.run(config)
    assert killed, "no decode worker was seen to kill"
    assert summary.error == 0 and summary.ok == summary.listed
    assert_same_state(config.output, undisturbed)


def run_until_killed(config_file: Path, env: dict[str, str], log: Path, trigger: Callable[[], bool]) -> None:
    """Start `python -m pipelines.run`, SIGKILL its process group as soon as `trigger()` holds."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.run", "--config", str(config_file)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 420
        while not trigger():
            assert process.poll() is None, f"run ended before the kill: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the kill point never came: {log.read_text()[-3000:]}"
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def has_files(directory: Path, pattern: str) -> Callable[[], bool]:
    return lambda: directory.exists() and any(directory.rglob(pattern))


def logged(log: Path, line: str) -> Callable[[], bool]:
    return lambda: log.exists() and line in log.read_text(errors="replace")


def registry_state(config_file: Path) -> dict[str, object]:
    config = load_config(config_file)
    use_tracking_uri(tracking_uri(config))
    client = MlflowClient()
    name = config.mlflow.registered_model
    versions = client.search_model_versions(f"name = '{name}'")
    champion = alias_version(client, name, CHAMPION)
    tags = client.get_model_version(name, champion).tags if champion else {}
    return {
        "versions": len(versions),
        "champion_is_candidate": champion is not None and champion == alias_version(client, name, CANDIDATE),
        "evaluated": "eval.zero_shot_object_top1" in tags,
        "decision": tags.get("promotion.decision"),
    }


def test_run_killed_in_every_stage_then_rerun_equals_an_undisturbed_run(
    ray_cluster, corpus: Path, undisturbed: str
) -> None:
    config_file = write_config(corpus, "killed")
    output = corpus / "killed"
    layout = Layout(str(output))
    log = corpus / "killed.log"
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.address}
    kill_points = {
        "extract": has_files(Path(layout.videos), f"_delta_log/{1:020d}.json"),  # rows committed
        "tokenize": has_files(Path(layout.tokens_root), "*.parquet"),
        # the snapshot is written once a checkpoint is registered: a resume can start from it
        "pretrain": has_files(Path(layout.train), "checkpoint_manager_snapshot.json"),
        "evaluate": logged(log, "=== evaluate ==="),
    }
    for trigger in kill_points.values():
        run_until_killed(config_file, env, log, trigger)

    run_stage.run(load_config(config_file))
    # Pretraining went on from the checkpoint the kill left (same Ray Train run, same MLflow
    # run), it did not start over.
    starts = [int(step) for step in re.findall(r"starting at step (\d+) of", log.read_text(errors="replace"))]
    assert starts[0] == 0 and any(step > 0 for step in starts[1:]), starts
    assert len(pretrain_runs(config_file)) == 1

    assert_same_state(str(output), undisturbed)
    # S3D features agree up to batch-dependent float noise (see assert_same_state), so the
    # codebooks are compared by their centroids, not by their content-hash versions.
    (ours_codebook, ours_tokenizer), (theirs_codebook, theirs_tokenizer) = (
        latest_versions(o) for o in (str(output), undisturbed)
    )
    assert ours_tokenizer == theirs_tokenizer
    ours_levels = HierarchicalCodebook.load(Layout(str(output)).codebook(ours_codebook)).levels
    theirs_levels = HierarchicalCodebook.load(Layout(undisturbed).codebook(theirs_codebook)).levels
    for ours_level, theirs_level in zip(ours_levels, theirs_levels, strict=True):
        np.testing.assert_allclose(ours_level.numpy(), theirs_level.numpy(), atol=5e-3)
    ours, theirs = (sorted_tokens(o).drop_columns(["codebook_version"]) for o in (str(output), undisturbed))
    assert ours.equals(theirs)
    reference = registry_state(write_config(corpus, "undisturbed"))
    assert (
        registry_state(config_file)
        == reference
        == {
            "versions": 1,
            "champion_is_candidate": True,
            "evaluated": True,
            "decision": "promoted",
        }
    )


def latest_versions(output: str) -> tuple[str, str]:
    (codebook,), (tokenizer,) = (
        sorted(m["version"] for m in listing(output)) for listing in (list_codebooks, list_tokenizers)
    )
    return codebook, tokenizer


def sorted_tokens(output: str) -> pa.Table:
    tokens = read_tokens(output, *latest_versions(output))
    return tokens.sort_by([("video_id", "ascending"), ("segment_index", "ascending")])


def pretrain_runs(config_file: Path) -> list[object]:
    experiment_id = setup_experiment(load_config(config_file))
    return MlflowClient().search_runs([experiment_id], "tags.stage = 'pretrain'")


def test_second_run_over_unchanged_inputs_does_no_work(ray_cluster, corpus: Path, undisturbed: str) -> None:
    config = load_config(write_config(corpus, "undisturbed"))
    manifest_before = read_manifest(config.output)
    files_before = files_state(config.output)  # the tables, checkpoints and the MLflow store
    second = run_stage.run(config)
    assert second["extract"].skipped == second["extract"].listed
    assert second["fit-codebook"].reused
    assert second["tokenize"].videos_tokenized == 0
    assert second["pretrain"].skipped and second["pretrain"].model_version == second["promote"].version
    assert second["evaluate"].skipped
    assert second["promote"].promoted and second["promote"].reason == "already champion"
    assert read_manifest(config.output).num_rows == manifest_before.num_rows
    assert registry_state(write_config(corpus, "undisturbed"))["versions"] == 1
    changed = {k for k in files_state(config.output).keys() | files_before.keys()} - {
        k for k, v in files_before.items() if files_state(config.output).get(k) == v
    }
    assert not changed, f"a rerun over unchanged inputs wrote {sorted(changed)}"
