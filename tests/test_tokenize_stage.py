"""fit-codebook + tokenize on the shared Ray cluster: synthetic committed features, then real videos.

The synthetic corpus goes through the table contracts only (manifest rows + features files),
so these tests exercise the stages independently of the extract stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipelines import fit_codebook, tokenize
from videobert import storage
from videobert.codebook import HierarchicalCodebook, latest_codebook
from videobert.config import load_config
from videobert.mlflow_utils import tracking_uri
from videobert.tables import FEATURE_DIM, FEATURES_SCHEMA, Layout, append_manifest, read_manifest, video_id
from videobert.text_tokenizer import TextTokenizer
from videobert.token_shards import read_tokens

REPO = Path(__file__).resolve().parent.parent
PROTOTYPES = np.random.default_rng(123).normal(size=(4, FEATURE_DIM))

TRANSCRIPTS = {
    "vtt": b"WEBVTT\n\n00:00:00.000 --> 00:00:03.000\nCrack the eggs into the bowl.\n\n"
    b"00:00:09.000 --> 00:00:12.000\nWhisk them well. Then heat the pan.\n",
    "srt": b"1\n00:00:01,500 --> 00:00:04,500\nChop the onions finely.\n",
    "json": json.dumps([{"start": 0, "end": 6, "text": "Stir the sauce slowly."}]).encode(),
    "bad.vtt": b"this is not a caption file",
}


def write_video(
    output: str, source_dir: str, number: int, clips: int = 10, transcript: str | None = None
) -> str:
    """One committed video: features of planted prototypes (L2-normalised), a sidecar, a manifest row."""
    source_uri = storage.join(source_dir, f"video{number}.mp4")
    vid = video_id(source_uri)
    rng = np.random.default_rng(number)
    kinds = rng.integers(0, len(PROTOTYPES), size=clips)
    features = PROTOTYPES[kinds] + 0.05 * rng.normal(size=(clips, FEATURE_DIM))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    table = pa.table(
        {
            "video_id": [vid] * clips,
            "clip_index": list(range(clips)),
            "start_s": [1.5 * i for i in range(clips)],
            "end_s": [1.5 * (i + 1) for i in range(clips)],
            "feature": pa.array(list(features.astype(np.float16)), FEATURES_SCHEMA.field("feature").type),
        },
        schema=FEATURES_SCHEMA,
    )
    storage.write_parquet(table, Layout(output).features_file(vid))
    transcript_uri = None
    if transcript:
        transcript_uri = storage.join(source_dir, f"video{number}.{transcript.split('.')[-1]}")
        storage.write_bytes(transcript_uri, TRANSCRIPTS[transcript])
    row = {
        "video_id": vid,
        "source_uri": source_uri,
        "etag": "e",
        "size": 1,
        "status": "ok",
        "num_clips": clips,
    }
    append_manifest(
        output, [{**row, "duration_s": 1.5 * clips, "transcript_uri": transcript_uri, "encoder": "synthetic"}]
    )
    return vid


def config_for(root: str, tmp_path: Path, *overrides: str):
    return load_config(
        None,
        [
            f"output={root}/out",
            f"source={root}/videos",
            "codebook.k=2",
            "codebook.depth=2",
            "codebook.sample_size=30",
            "codebook.iterations=10",
            "codebook.gallery_words=2",
            "text.vocab_size=80",
            "tokenize.segment_tokens=4",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            *overrides,
        ],
    )


def mtimes(directory: str) -> dict[str, int]:
    return {f: os.stat(f).st_mtime_ns for f in storage.list_files(directory, suffix=".parquet")}


def test_fit_codebook_and_tokenize_incremental_idempotent_versioned(ray_cluster, tmp_path):
    config = config_for(str(tmp_path), tmp_path)
    output, source = config.output, config.source
    kinds = ["vtt", "srt", "json", "bad.vtt", None]
    vids = [write_video(output, source, i, transcript=kind) for i, kind in enumerate(kinds)]

    fitted = fit_codebook.run(config)
    assert not fitted["reused"] and fitted["sample_size"] == 30
    directory = fitted["codebook_uri"]
    for name in ("centroids.safetensors", "codebook.json", "gallery.png"):
        assert storage.exists(storage.join(directory, name)), name
    # The MLflow run of its own: params, inertia and the artifacts.
    mlflow.set_tracking_uri(tracking_uri(config))
    run = mlflow.get_run(fitted["mlflow_run_id"])
    assert run.data.params["k"] == "2" and "inertia_level_1" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "codebook")}
    assert {"codebook/codebook.json", "codebook/gallery.png", "codebook/centroids.safetensors"} <= artifacts
    # Refit of the same sample gives the same version; without refit the codebook is reused.
    assert fit_codebook.run(config)["reused"] is True
    refit = fit_codebook.run(config_for(str(tmp_path), tmp_path, "codebook.refit=true"))
    assert refit["codebook_version"] == fitted["codebook_version"]

    first = tokenize.run(config)
    assert first["videos_tokenized"] == 5 and first["transcript_errors"] == 1 and first["errors"] == 0
    tokens = read_tokens(output, first["codebook_version"], first["tokenizer_version"])
    assert set(tokens.column("video_id").to_pylist()) == set(vids)
    assert tokens.num_rows == first["segments"]
    codebook = HierarchicalCodebook.load(directory)
    tokenizer = TextTokenizer.load(first["tokenizer_uri"])
    by_video = {v: tokens.filter(pc.equal(tokens.column("video_id"), v)).to_pylist() for v in vids}
    # VTT video: two cues -> three sentences with their clips; the rest are video-only segments.
    vtt = by_video[vids[0]]
    assert [(r["text"], r["start_s"]) for r in vtt if r["text"]] == [
        ("Crack the eggs into the bowl.", 0.0),
        ("Whisk them well.", 9.0),
        ("Then heat the pan.", pytest.approx(10.5, abs=0.1)),
    ]
    assert vtt[0]["video_tokens"] == codebook.assign(features_of(output, vids[0])[:2]).tolist()
    assert vtt[0]["text_ids"] == tokenizer.encode("Crack the eggs into the bowl.")
    # Each video's segments cover all its clips; video-only segments hold at most 4 tokens.
    for rows in by_video.values():
        assert [r["segment_index"] for r in rows] == list(range(len(rows)))
        assert all(len(r["video_tokens"]) <= 4 for r in rows if not r["text"])
    # The bad transcript: recorded in the manifest, the video still has video-only segments.
    manifest = read_manifest(output).to_pylist()
    errors = {r["video_id"]: r["transcript_error"] for r in manifest if r["transcript_error"]}
    assert list(errors) == [vids[3]] and "WEBVTT" in errors[vids[3]]
    assert all(r["status"] == "ok" for r in manifest)
    assert [len(r["video_tokens"]) for r in by_video[vids[3]]] == [4, 4, 2]
    assert all(r["text"] == "" for r in by_video[vids[4]])

    # Rerun: nothing to do, nothing rewritten, no new manifest rows.
    before, parts = mtimes(first["tokens_dir"]), storage.list_files(Layout(output).videos)
    again = tokenize.run(config)
    assert again["videos_tokenized"] == 0 and again["videos_done_before"] == 5
    assert mtimes(first["tokens_dir"]) == before and storage.list_files(Layout(output).videos) == parts

    # Incremental: only the new video is tokenized, with the same versions.
    new_vid = write_video(output, source, 9, transcript="srt")
    third = tokenize.run(config)
    assert third["videos_tokenized"] == 1 and third["tokens_dir"] == first["tokens_dir"]
    after = mtimes(first["tokens_dir"])
    assert {f: t for f, t in after.items() if f in before} == before and len(after) == 6
    assert new_vid in set(
        read_tokens(output, first["codebook_version"], first["tokenizer_version"])["video_id"].to_pylist()
    )

    # New codebook version: everything under a new directory; the old one is untouched.
    other = fit_codebook.run(config_for(str(tmp_path), tmp_path, "codebook.refit=true", "codebook.seed=5"))
    assert other["codebook_version"] != fitted["codebook_version"]
    assert latest_codebook(output, k=2, depth=2) == other["codebook_uri"]
    fourth = tokenize.run(config)
    assert fourth["codebook_version"] == other["codebook_version"] and fourth["videos_tokenized"] == 6
    assert fourth["tokens_dir"] != first["tokens_dir"] and mtimes(first["tokens_dir"]) == after
    new_tokens = read_tokens(output, fourth["codebook_version"], fourth["tokenizer_version"])
    assert set(new_tokens.column("codebook_version").to_pylist()) == {other["codebook_version"]}


def features_of(output: str, vid: str) -> np.ndarray:
    from videobert.token_shards import features_array

    return features_array(storage.read_parquet(Layout(output).features_file(vid)))


def test_stages_round_trip_through_s3(ray_cluster, s3_bucket, tmp_path):
    config = config_for(s3_bucket, tmp_path, "tokenize.segment_tokens=3")
    vids = [
        write_video(config.output, config.source, i, clips=7, transcript=kind)
        for i, kind in enumerate(["json", None])
    ]
    fitted = fit_codebook.run(config)
    assert fitted["codebook_uri"].startswith("s3://")
    summary = tokenize.run(config)
    assert summary["videos_tokenized"] == 2 and summary["tokens_dir"].startswith(s3_bucket)
    tokens = read_tokens(config.output, summary["codebook_version"], summary["tokenizer_version"])
    assert sorted(set(tokens.column("video_id").to_pylist())) == sorted(vids)
    json_rows = tokens.filter(pc.equal(tokens.column("video_id"), vids[0])).to_pylist()
    assert json_rows[0]["text"] == "Stir the sauce slowly." and len(json_rows[0]["video_tokens"]) == 4
    assert tokenize.run(config)["videos_tokenized"] == 0


def test_tokenize_without_codebook_fails_clearly(tmp_path):
    config = config_for(str(tmp_path), tmp_path)
    assert tokenize.main(["--set", f"output={config.output}"]) == 3


def test_extract_then_fit_codebook_then_tokenize(ray_cluster, tmp_path):
    """Generated videos with a VTT sidecar -> extract -> fit-codebook -> tokenize."""
    import yaml
    from PIL import Image

    from pipelines import extract
    from tests import videos

    source = tmp_path / "videos"
    for i, shape in enumerate(["circle", "square"]):
        videos.make_object_video(
            source / f"v{i}.mp4", seed=40 + i, num_frames=32, height=64, width=64, shape=shape
        )
    (source / "v0.vtt").write_bytes(
        b"WEBVTT\n\n00:00:00.500 --> 00:00:02.500\nA circle moves. It slides on.\n"
    )
    settings = {
        "source": str(source),
        "output": str(tmp_path / "out"),
        "decode": {"fps": 8, "clip_frames": 8, "size": 64},
        "encoder": {"weights": "none", "batch_size": 4},
        "extract": {"feature_actors": 1},
        "codebook": {"k": 2, "depth": 2, "sample_size": 100, "iterations": 10, "gallery_words": 2},
        "text": {"vocab_size": 60},
        "tokenize": {"segment_tokens": 2},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    }
    config_file = tmp_path / "experiment.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    config = load_config(config_file)
    extract.run(config)
    fitted = fit_codebook.run(config)
    # The gallery shows real decoded frames: not only the grey "unreadable" tiles.
    gallery = np.asarray(Image.open(storage.join(fitted["codebook_uri"], "gallery.png")).convert("RGB"))
    assert gallery.shape[0] == 2 * 96 and len(np.unique(gallery.reshape(-1, 3), axis=0)) > 10

    summary = tokenize.run(config)
    manifest = read_manifest(config.output)
    ok = manifest.filter(pc.equal(manifest.column("status"), "ok"))
    assert ok.num_rows == 2 and summary["videos_tokenized"] == 2 and summary["transcript_errors"] == 0
    tokens = read_tokens(config.output, summary["codebook_version"], summary["tokenizer_version"])
    assert set(tokens.column("video_id").to_pylist()) == set(ok.column("video_id").to_pylist())
    assert sorted(t for t in tokens.column("text").to_pylist() if t) == ["A circle moves.", "It slides on."]
    # Every clip of every video lands in at least one segment.
    for row in ok.to_pylist():
        rows = tokens.filter(pc.equal(tokens.column("video_id"), row["video_id"]))
        assert sum(len(v) for v in rows.column("video_tokens").to_pylist()) >= row["num_clips"]


def test_fit_codebook_by_ray_job_submit(ray_cluster, tmp_path):
    """`ray job submit ... python -m pipelines.fit_codebook` against the shared cluster."""
    import yaml

    from tests.conftest import ray_bin
    from tests.test_job_submit_extract import UPLOAD_EXCLUDES

    config = config_for(str(tmp_path), tmp_path)
    for i in range(2):
        write_video(config.output, config.source, i, transcript="vtt" if i == 0 else None)
    config_file = tmp_path / "experiment.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    command = [
        ray_bin(), "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}), "--",
        sys.executable, "-m", "pipelines.fit_codebook", "--config", str(config_file),
    ]  # fmt: skip
    deadline = time.monotonic() + 45
    while True:
        result = subprocess.run(
            command, cwd=REPO, env=ray_cluster.env, capture_output=True, text=True, timeout=300
        )
        # A loaded machine may not have the node's dashboard agent up yet: Ray says to retry.
        if "No available agent to submit job" not in result.stderr:
            break
        if time.monotonic() > deadline:
            pytest.skip("the cluster's dashboard agent never accepted the job (Ray: 'No available agent')")
        time.sleep(5)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    codebook_uri = latest_codebook(config.output, k=2, depth=2)
    assert codebook_uri is not None and storage.exists(storage.join(codebook_uri, "gallery.png"))
    assert HierarchicalCodebook.load(codebook_uri).metadata["sample_size"] == 20
