"""fit-codebook + tokenize on the shared Ray cluster: synthetic committed features, then real videos.

The synthetic corpus (tests/feature_corpus.py) goes through the table contracts only (manifest
rows + features files), so these tests exercise the stages independently of the extract stage.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines import fit_codebook, tokenize
from pipelines.common import EXIT_MISSING_INPUT
from tests.feature_corpus import write_video
from videobert import storage
from videobert.codebook import HierarchicalCodebook, latest_codebook
from videobert.config import ExperimentConfig, load_config
from videobert.tables import Layout, read_manifest, upsert_manifest
from videobert.text_tokenizer import TextTokenizer, list_tokenizers
from videobert.token_shards import read_tokens
from videobert.tracking import tracking_uri, use_tracking_uri

REPO = Path(__file__).resolve().parent.parent


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
    assert not fitted.reused and fitted.sample_size == 30
    directory = fitted.uri
    for name in ("centroids.safetensors", "codebook.json", "gallery.png"):
        assert storage.exists(storage.join(directory, name)), name
    # The MLflow run of its own: params, inertia and the artifacts.
    use_tracking_uri(tracking_uri(config))
    run = mlflow.get_run(fitted.mlflow_run_id)
    assert run.data.params["k"] == "2" and "inertia_level_1" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "codebook")}
    assert {"codebook/codebook.json", "codebook/gallery.png", "codebook/centroids.safetensors"} <= artifacts
    # Refit of the same sample gives the same version; without refit the codebook is reused.
    assert fit_codebook.run(config).reused is True
    refit = fit_codebook.run(config_for(str(tmp_path), tmp_path, "codebook.refit=true"))
    assert refit.version == fitted.version

    first = tokenize.run(config)
    assert first.videos_tokenized == 5 and first.transcript_errors == 1 and first.errors == 0
    tokens = read_tokens(output, first.codebook.version, first.tokenizer.version)
    assert set(tokens.column("video_id").to_pylist()) == set(vids)
    assert tokens.num_rows == first.segments
    codebook = HierarchicalCodebook.load(directory)
    tokenizer = TextTokenizer.load(first.tokenizer.uri)
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
    before, parts = mtimes(first.tokens_uri), storage.list_files(Layout(output).videos)
    again = tokenize.run(config)
    assert again.videos_tokenized == 0 and again.videos_done_before == 5
    assert mtimes(first.tokens_uri) == before and storage.list_files(Layout(output).videos) == parts

    # Incremental: only the new video is tokenized, with the same versions.
    new_vid = write_video(output, source, 9, transcript="srt")
    third = tokenize.run(config)
    assert third.videos_tokenized == 1 and third.tokens_uri == first.tokens_uri
    after = mtimes(first.tokens_uri)
    assert {f: t for f, t in after.items() if f in before} == before and len(after) == 6
    assert new_vid in set(
        read_tokens(output, first.codebook.version, first.tokenizer.version)["video_id"].to_pylist()
    )

    # Changed inputs: vids[0]'s transcript is rewritten; vids[1] is re-extracted from a changed
    # source (new ETag, new features); vids[2]'s re-extract failed (manifest `error`, features
    # gone). Exactly those are redone or removed; every other token file stays as it was.
    tokens_dir = first.tokens_uri
    changed = {storage.join(tokens_dir, f"{v}.parquet") for v in vids[:3]}
    storage.write_bytes(
        storage.join(source, "video0.vtt"), b"WEBVTT\n\n00:00:03.000 --> 00:00:06.000\nPour the batter in.\n"
    )
    write_video(output, source, 1, clips=12, transcript="srt", seed=77, etag="e2")
    failed = next(r for r in read_manifest(output).to_pylist() if r["video_id"] == vids[2])
    failed.pop("updated_at")
    upsert_manifest(output, [{**failed, "status": "error", "error": "decode: broken"}])
    storage.delete(Layout(output).features_file(vids[2]))
    fifth = tokenize.run(config)
    assert (fifth.videos_tokenized, fifth.videos_changed, fifth.videos_removed) == (2, 2, 1)
    now = mtimes(tokens_dir)
    assert storage.join(tokens_dir, f"{vids[2]}.parquet") not in now
    assert {f: t for f, t in now.items() if f not in changed} == {
        f: t for f, t in after.items() if f not in changed
    }
    tokens = read_tokens(output, first.codebook.version, first.tokenizer.version)
    keys = list(zip(tokens["video_id"].to_pylist(), tokens["segment_index"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) and vids[2] not in {v for v, _ in keys}
    rows = {v: tokens.filter(pc.equal(tokens.column("video_id"), v)).to_pylist() for v in vids[:2]}
    assert [r["text"] for r in rows[vids[0]] if r["text"]] == ["Pour the batter in."]
    assert segment_rows(rows[vids[1]]) == expected_segments(config, vids[1], codebook)
    assert len(features_of(output, vids[1])) == 12
    again = tokenize.run(config)  # the recorded inputs now match: nothing to redo
    assert again.videos_tokenized == 0 and again.videos_done_before == 5
    after = mtimes(tokens_dir)

    # New codebook version: everything under a new directory; the old one is untouched.
    # (Fitted the fast way: the config's training subsample and seeding reach the fit.)
    fast = ("codebook.max_points_per_centroid=3", "codebook.init_trials=1")
    other = fit_codebook.run(
        config_for(str(tmp_path), tmp_path, "codebook.refit=true", "codebook.seed=5", *fast)
    )
    assert other.version != fitted.version
    other_meta = HierarchicalCodebook.load(other.uri).metadata
    assert (other_meta["max_points_per_centroid"], other_meta["init_trials"]) == (3, 1)
    assert latest_codebook(output, k=2, depth=2) == other.uri
    fourth = tokenize.run(config)
    assert fourth.codebook.version == other.version and fourth.videos_tokenized == 5
    assert fourth.tokens_uri != first.tokens_uri and mtimes(first.tokens_uri) == after
    new_tokens = read_tokens(output, fourth.codebook.version, fourth.tokenizer.version)
    assert set(new_tokens.column("codebook_version").to_pylist()) == {other.version}


def features_of(output: str, vid: str) -> np.ndarray:
    from videobert.token_shards import features_array

    return features_array(storage.read_parquet(Layout(output).features_file(vid)))


def expected_segments(config, vid: str, codebook: HierarchicalCodebook) -> list[tuple]:
    """A video's segments recomputed from its committed features and current transcript."""
    from videobert.align import align_segments
    from videobert.token_shards import load_sentences

    row = next(r for r in read_manifest(config.output).to_pylist() if r["video_id"] == vid)
    table = storage.read_parquet(Layout(config.output).features_file(vid)).sort_by("clip_index")
    clips = list(zip(*(table[c].to_pylist() for c in ("clip_index", "start_s", "end_s")), strict=True))
    words = codebook.assign(features_of(config.output, vid)).tolist()
    uri = row["transcript_uri"]
    sentences = load_sentences(uri, config.s3, config.tokenize.sentence_gap_s) if uri else None
    segments = align_segments(vid, clips, words, sentences, config.tokenize.segment_tokens)
    return [(s.segment_index, s.start_s, s.end_s, s.text, s.video_tokens) for s in segments]


def segment_rows(rows: list[dict]) -> list[tuple]:
    return [(r["segment_index"], r["start_s"], r["end_s"], r["text"], r["video_tokens"]) for r in rows]


def test_stages_round_trip_through_s3(ray_cluster, s3_bucket, tmp_path):
    config = config_for(s3_bucket, tmp_path, "tokenize.segment_tokens=3")
    vids = [
        write_video(config.output, config.source, i, clips=7, transcript=kind)
        for i, kind in enumerate(["json", None])
    ]
    fitted = fit_codebook.run(config)
    assert fitted.uri.startswith("s3://")
    summary = tokenize.run(config)
    assert summary.videos_tokenized == 2 and summary.tokens_uri.startswith(s3_bucket)
    tokens = read_tokens(config.output, summary.codebook.version, summary.tokenizer.version)
    assert sorted(set(tokens.column("video_id").to_pylist())) == sorted(vids)
    json_rows = tokens.filter(pc.equal(tokens.column("video_id"), vids[0])).to_pylist()
    assert json_rows[0]["text"] == "Stir the sauce slowly." and len(json_rows[0]["video_tokens"]) == 4
    assert tokenize.run(config).videos_tokenized == 0


def test_tokenize_without_codebook_fails_clearly(tmp_path):
    config = config_for(str(tmp_path), tmp_path)
    assert tokenize.main(["--set", f"output={config.output}"]) == EXIT_MISSING_INPUT


@dataclass
class Extracted:
    """The module's generated-video corpus after its first extract -> fit-codebook -> tokenize."""

    config: ExperimentConfig
    source: Path
    fitted: dict
    summary: dict
    manifest: pa.Table  # snapshots taken right after the first tokenize
    tokens: pa.Table


@pytest.fixture(scope="module")
def extracted(ray_cluster, tmp_path_factory) -> Extracted:
    """Generated videos with a VTT sidecar -> extract -> fit-codebook -> tokenize, once per module."""
    import yaml

    from pipelines import extract
    from tests import videos

    tmp_path = tmp_path_factory.mktemp("extracted")
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
        "encoder": {"weights": "none", "clips_per_batch": 4},
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
    summary = tokenize.run(config)
    tokens = read_tokens(config.output, summary.codebook.version, summary.tokenizer.version)
    return Extracted(config, source, fitted, summary, read_manifest(config.output), tokens)


def test_extract_then_fit_codebook_then_tokenize(extracted):
    """Generated videos with a VTT sidecar -> extract -> fit-codebook -> tokenize."""
    from PIL import Image

    summary, manifest, tokens = extracted.summary, extracted.manifest, extracted.tokens
    # The gallery shows real decoded frames: not only the grey "unreadable" tiles.
    gallery = np.asarray(Image.open(storage.join(extracted.fitted.uri, "gallery.png")).convert("RGB"))
    assert gallery.shape[0] == 2 * 96 and len(np.unique(gallery.reshape(-1, 3), axis=0)) > 10

    ok = manifest.filter(pc.equal(manifest.column("status"), "ok"))
    assert ok.num_rows == 2 and summary.videos_tokenized == 2 and summary.transcript_errors == 0
    assert set(tokens.column("video_id").to_pylist()) == set(ok.column("video_id").to_pylist())
    assert sorted(t for t in tokens.column("text").to_pylist() if t) == ["A circle moves.", "It slides on."]
    # Every clip of every video lands in at least one segment.
    for row in ok.to_pylist():
        rows = tokens.filter(pc.equal(tokens.column("video_id"), row["video_id"]))
        assert sum(len(v) for v in rows.column("video_tokens").to_pylist()) >= row["num_clips"]


def test_changed_source_video_is_extracted_and_tokenized_again(extracted):
    """A source video rewritten with other content (and its transcript): extract + tokenize redo
    that video only; its rows are replaced, not duplicated; the other video's files stay."""
    from pipelines import extract
    from tests import videos

    config = extracted.config
    layout = Layout(config.output)
    tokens_dir = extracted.summary.tokens_uri
    ids = {Path(r["source_uri"]).stem: r["video_id"] for r in read_manifest(config.output).to_pylist()}
    features_before, tokens_before = mtimes(layout.features), mtimes(tokens_dir)
    videos.make_object_video(
        extracted.source / "v0.mp4", seed=90, num_frames=48, height=64, width=64, shape="triangle"
    )
    (extracted.source / "v0.vtt").write_bytes(
        b"WEBVTT\n\n00:00:03.000 --> 00:00:05.000\nA triangle turns. It stops.\n"
    )
    assert extract.run(config).ok == 1  # the changed video only
    summary = tokenize.run(config)
    assert (summary.videos_tokenized, summary.videos_changed, summary.videos_done_before) == (
        1,
        1,
        1,
    )

    kept = {f for f in features_before if ids["v1"] in f}
    assert {f: mtimes(layout.features)[f] for f in kept} == {f: features_before[f] for f in kept}
    v1_tokens = storage.join(tokens_dir, f"{ids['v1']}.parquet")
    assert mtimes(tokens_dir)[v1_tokens] == tokens_before[v1_tokens]
    tokens = read_tokens(config.output, summary.codebook.version, summary.tokenizer.version)
    keys = list(zip(tokens["video_id"].to_pylist(), tokens["segment_index"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys))
    rows = tokens.filter(pc.equal(tokens.column("video_id"), ids["v0"])).to_pylist()
    assert [r["text"] for r in rows if r["text"]] == ["A triangle turns.", "It stops."]
    codebook = HierarchicalCodebook.load(extracted.fitted.uri)
    assert segment_rows(rows) == expected_segments(config, ids["v0"], codebook)
    assert len(features_of(config.output, ids["v0"])) == 6  # 48 frames at 8 fps, 8-frame clips
    assert tokenize.run(config).videos_tokenized == 0


def test_fit_codebook_and_tokenize_by_ray_job_submit(ray_cluster, tmp_path):
    """`ray job submit ... python -m pipelines.fit_codebook && ... tokenize` on the shared cluster."""
    import yaml

    config = config_for(str(tmp_path), tmp_path)
    written = {
        write_video(config.output, config.source, i, transcript="vtt" if i == 0 else None) for i in range(2)
    }
    config_file = tmp_path / "experiment.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    stages = " && ".join(
        f"{sys.executable} -m pipelines.{stage} --config {config_file}"
        for stage in ("fit_codebook", "tokenize")
    )
    result = ray_cluster.submit(["bash", "-c", stages])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    codebook_uri = latest_codebook(config.output, k=2, depth=2)
    assert codebook_uri is not None and storage.exists(storage.join(codebook_uri, "gallery.png"))
    codebook = HierarchicalCodebook.load(codebook_uri)
    assert codebook.metadata["sample_size"] == 20
    (tokenizer,) = list_tokenizers(config.output)
    tokens = read_tokens(config.output, codebook.version, tokenizer["version"])
    assert set(tokens.column("video_id").to_pylist()) == written


def test_pretrain_trains_on_what_tokenize_made_for_this_config(ray_cluster, tmp_path):
    """Switch `text.vocab_size` to a new value and back: tokenize reuses the first tokenizer,
    and pretrain run alone must train on that tokenizer's shards, not on the newest ones."""
    from pipelines import pretrain
    from videobert.registry import load_registered_model

    training = (
        "model.size=debug",
        "model.max_seq_len=64",
        "train.steps=1",
        "train.batch_size=4",
        "train.checkpoint_every=1",
        "evaluate.holdout_fraction=0",
    )
    small = config_for(str(tmp_path), tmp_path, "text.vocab_size=40", *training)
    large = config_for(str(tmp_path), tmp_path, "text.vocab_size=60", *training)
    for number in range(4):
        write_video(small.output, small.source, number, transcript="vtt")
    fit_codebook.run(small)
    chosen = tokenize.run(small)
    newer = tokenize.run(large)
    assert newer.tokenizer.version != chosen.tokenizer.version  # two tokenizers, two shard sets
    back = tokenize.run(small)
    assert back.tokenizer == chosen.tokenizer and back.videos_tokenized == 0

    trained = pretrain.run(small)
    use_tracking_uri(tracking_uri(small))
    _, vocab, meta = load_registered_model(trained.model_uri)
    assert meta["tokenizer_version"] == chosen.tokenizer.version
    assert meta["tokens_uri"] == chosen.tokens_uri
    assert vocab.text_size == len(TextTokenizer.load(chosen.tokenizer.uri).vocab)


def test_parquet_reads_start_footer_readers_by_file_count(ray_cluster, tmp_path):
    """fit-codebook's and pretrain's reads: a few files get one FooterReader actor, not Ray's
    default 32 worker processes (seconds of start-up per read on a small node)."""
    import ray
    from ray.util.state import list_actors

    from pipelines.ray_stages import FOOTER_ACTORS_ENV, read_parquet_files

    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"part{i}.parquet"))
        pq.write_table(pa.table({"x": [i, i + 10], "y": ["a", "b"]}), paths[-1])

    def footer_readers() -> set[str]:
        actors = list_actors(
            filters=[("class_name", "=", "FooterReader")], limit=10_000, raise_on_missing_output=False
        )
        return {a.actor_id for a in actors}

    before = footer_readers()
    dataset = read_parquet_files(paths, None, ["x"])
    assert FOOTER_ACTORS_ENV not in os.environ  # set for the planning of this read only
    read = pa.concat_tables(ray.get(dataset.to_arrow_refs()))
    expected = [*range(6), *range(10, 16)]
    assert read.column_names == ["x"] and sorted(read.column("x").to_pylist()) == expected
    assert len(footer_readers() - before) == 1
