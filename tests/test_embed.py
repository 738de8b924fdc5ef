"""`videobert embed`: batch inference with a registered model on the shared Ray cluster.

A tiny world: object videos (one of them copied byte for byte), a corrupt file, a codebook fit
on the videos' own features, and two debug-size model versions registered on SQLite with
`champion` on the first. Expected words and embeddings are computed here in one process,
from decoded clips and the model's own layers, not through the stage's code.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from pipelines import embed
from pipelines.common import EXIT_MISSING_INPUT
from tests import videos
from videobert import storage, tables
from videobert.codebook import HierarchicalCodebook
from videobert.config import ExperimentConfig, load_config
from videobert.decode import iter_clips
from videobert.embedding import embed_videos
from videobert.features import ClipEncoder, encoder_id
from videobert.model import CLS, SEP, VIDEO_TYPE, JointVocab, VideoBert, build_model
from videobert.registry import log_and_register_model, resolve_model_version
from videobert.tracking import start_or_resume_run, use_tracking_uri
from videobert.videos import list_videos, rows_by_video, videos_to_do

MAX_SEQ_LEN = 5  # 3 video tokens a pass: the 6-clip videos run as 2 chunks


@dataclass
class World:
    config_path: Path
    config: ExperimentConfig
    source: Path
    codebook: HierarchicalCodebook
    champion: VideoBert
    vocab: JointVocab
    features: dict[str, np.ndarray]  # video file name -> float16 clip features, clip order


def clip_features(uri: str, config: ExperimentConfig, encoder: ClipEncoder) -> np.ndarray:
    """Decode and encode a video in this process, as extract stores it (float16)."""
    frames = np.stack([clip.frames for clip in iter_clips(uri, config.decode)])
    return encoder(frames).astype(np.float16)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("embed")
    source = root / "src"
    for name, seed in (("video0.mp4", 0), ("video1.mp4", 1)):
        videos.make_object_video(source / name, seed=seed, num_frames=48, height=64, width=80)
    shutil.copy(source / "video0.mp4", source / "copy_of_video0.mp4")
    bad = videos.make_bad_videos(root / "bad")
    shutil.copy(bad["corrupted"], source / "corrupted.mkv")
    values = {
        "source": str(source),
        "output": str(root / "out"),
        "decode": {"fps": 8, "clip_frames": 8, "size": 64},
        "encoder": {"weights": "none", "clips_per_batch": 4},
        "extract": {"manifest_flush_every": 2},
        "embed": {"videos_per_batch": 2},
        "mlflow": {"tracking_uri": f"sqlite:///{root}/mlflow.db"},
    }
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(values))
    config = load_config(config_path)

    encoder = ClipEncoder(config.encoder, device="cpu")
    features = {
        name: clip_features(str(source / name), config, encoder) for name in ("video0.mp4", "video1.mp4")
    }
    codebook = HierarchicalCodebook.fit(
        np.concatenate(list(features.values())), k=2, depth=2, seed=0, encoder=encoder_id(config.encoder)
    )
    codebook_uri = codebook.save(str(root / "codebook"))
    vocab = JointVocab(8, codebook.vocab_size)
    metadata = {
        "codebook_uri": codebook_uri,
        "codebook_version": codebook.version,
        "max_seq_len": MAX_SEQ_LEN,
    }
    champion = build_model("debug", vocab, max_positions=16, seed=1).eval()
    for version, (seed, alias) in enumerate([(1, "champion"), (2, "candidate")], start=1):
        model = champion if seed == 1 else build_model("debug", vocab, max_positions=16, seed=seed)
        run_id, _ = start_or_resume_run(config, f"embed-test-{seed}")
        assert log_and_register_model(run_id, model, vocab, metadata, config, "videobert", alias) == str(
            version
        )
    yield World(config_path, config, source, codebook, champion, vocab, features)
    mlflow.set_tracking_uri(None)


def reference_embedding(model: VideoBert, vocab: JointVocab, words: np.ndarray) -> tuple[np.ndarray, ...]:
    """Mean last hidden state over the video tokens of `[CLS] chunk [SEP]` passes; mean [CLS]."""
    chunks = np.array_split(np.asarray(words), math.ceil(len(words) / (MAX_SEQ_LEN - 2)))
    video_states, cls_states = [], []
    with torch.no_grad():
        for chunk in chunks:
            ids = torch.tensor([[CLS, *(vocab.video_offset + chunk).tolist(), SEP]])
            hidden = model.encode(ids, torch.full_like(ids, VIDEO_TYPE))[0]
            video_states.append(hidden[1:-1])
            cls_states.append(hidden[0])
    return torch.cat(video_states).mean(0).numpy(), torch.stack(cls_states).mean(0).numpy()


def by_name(table: pa.Table) -> dict[str, dict]:
    return {Path(row["source_uri"]).name: row for row in table.to_pylist()}


def test_embed_champion_then_incremental_reruns(ray_cluster, world: World) -> None:
    summary = embed.run(world.config)  # embed.model_uri left at its default: @champion
    assert (summary.model_uri, summary.requested_uri) == ("models:/videobert/1", "models:/videobert@champion")
    assert summary.directory == str(Path(world.config.output) / "embeddings" / "videobert-v1")
    assert (summary.listed, summary.ok, summary.error, summary.skipped, summary.reused) == (4, 3, 1, 0, 0)
    layout = tables.EmbeddingLayout(summary.directory)
    manifest = by_name(tables.read_table(layout.manifest, tables.EMBED_MANIFEST_SCHEMA))
    assert len(manifest) == 4  # every listed video has exactly one row
    assert manifest["corrupted.mkv"]["status"] == "error"
    assert manifest["corrupted.mkv"]["error"].startswith("decode:"), manifest["corrupted.mkv"]
    assert summary.errors == {str(world.source / "corrupted.mkv"): manifest["corrupted.mkv"]["error"]}

    rows = by_name(tables.read_embeddings(summary.directory))
    assert sorted(rows) == ["copy_of_video0.mp4", "video0.mp4", "video1.mp4"]
    for name, row in rows.items():
        expected_words = world.codebook.assign(world.features[name.removeprefix("copy_of_")])
        assert row["visual_words"] == expected_words.tolist()
        assert (row["num_clips"], row["num_chunks"], row["model_uri"]) == (6, 2, "models:/videobert/1")
        assert len(row["embedding"]) == len(row["cls_embedding"]) == world.champion.config.hidden
        embedding, cls_embedding = reference_embedding(world.champion, world.vocab, expected_words)
        np.testing.assert_allclose(row["embedding"], embedding, atol=1e-5)
        np.testing.assert_allclose(row["cls_embedding"], cls_embedding, atol=1e-5)
        assert manifest[name]["status"] == "ok" and manifest[name]["features"] == "decoded"
    np.testing.assert_array_equal(rows["copy_of_video0.mp4"]["embedding"], rows["video0.mp4"]["embedding"])
    assert rows["video1.mp4"]["visual_words"] != rows["video0.mp4"]["visual_words"]
    assert not np.allclose(rows["video1.mp4"]["embedding"], rows["video0.mp4"]["embedding"], atol=1e-3)

    # A new video that extract already turned into features: its features are reused, not decoded.
    # They are video1's on purpose, so only reuse can give it video1's words and embedding.
    videos.make_object_video(world.source / "new.mp4", seed=7, num_frames=24, height=64, width=80)
    (new,) = [v for v in list_videos(world.config) if v["source_uri"].endswith("new.mp4")]
    planted = world.features["video1.mp4"]
    storage.write_parquet(
        pa.table(
            {
                "video_id": [new["video_id"]] * len(planted),
                "clip_index": list(range(len(planted))),
                "start_s": [float(i) for i in range(len(planted))],
                "end_s": [float(i + 1) for i in range(len(planted))],
                "feature": list(planted),
            },
            schema=tables.FEATURES_SCHEMA,
        ),
        tables.Layout(world.config.output).features_file(new["video_id"]),
    )
    tables.upsert_manifest(
        world.config.output,
        [{**new, "status": "ok", "num_clips": len(planted), "encoder": encoder_id(world.config.encoder)}],
    )
    second = embed.run(world.config)
    assert (second.listed, second.ok, second.error, second.skipped, second.reused) == (5, 1, 0, 4, 1)
    rows2 = by_name(tables.read_embeddings(summary.directory))
    assert rows2["new.mp4"]["visual_words"] == rows["video1.mp4"]["visual_words"]
    np.testing.assert_allclose(rows2["new.mp4"]["embedding"], rows["video1.mp4"]["embedding"], atol=1e-6)
    assert {k: v for k, v in rows2.items() if k != "new.mp4"} == rows  # untouched, not rewritten
    assert by_name(tables.read_table(layout.manifest, tables.EMBED_MANIFEST_SCHEMA))["new.mp4"][
        "features"
    ] == ("reused")

    # Nothing new: nothing is embedded, decoded or rewritten (the bad file is not retried either).
    third = embed.run(world.config)
    assert (third.listed, third.ok, third.error, third.skipped) == (5, 0, 0, 5)
    assert by_name(tables.read_embeddings(summary.directory)) == rows2
    assert manifest["corrupted.mkv"]["error_kind"] == "permanent"


def test_embedding_pools_video_tokens_over_chunks() -> None:
    vocab = JointVocab(8, 4)
    model = build_model("debug", vocab, max_positions=16, seed=3).eval()
    long = np.array([0, 1, 2, 3, 3, 2, 1])  # 7 words, 3 a pass -> chunks of 3, 2, 2
    short = np.array([2, 1])
    result = embed_videos(model, vocab, [long, short], MAX_SEQ_LEN)
    assert result.num_chunks.tolist() == [3, 1]
    for i, words in enumerate([long, short]):
        embedding, cls_embedding = reference_embedding(model, vocab, words)
        np.testing.assert_allclose(result.embedding[i], embedding, atol=1e-5)
        np.testing.assert_allclose(result.cls_embedding[i], cls_embedding, atol=1e-5)
    # Padding never leaks: a video alone gives what it gives among longer batch mates.
    alone = embed_videos(model, vocab, [short], MAX_SEQ_LEN)
    np.testing.assert_allclose(alone.embedding[0], result.embedding[1], atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        embed_videos(model, vocab, [np.array([4])], MAX_SEQ_LEN)


def test_resolution_and_exit_codes(world: World, capsys: pytest.CaptureFixture) -> None:
    use_tracking_uri(world.config.mlflow.tracking_uri)
    assert resolve_model_version("models:/videobert/2").uri == "models:/videobert/2"
    candidate = resolve_model_version("models:/videobert@candidate")
    assert (candidate.version, candidate.num_visual, candidate.metadata["max_seq_len"]) == (
        "2",
        4,
        MAX_SEQ_LEN,
    )

    config = ["--config", str(world.config_path)]
    assert embed.main([*config, "--set", "embed.model_uri=models:/videobert@nope"]) == EXIT_MISSING_INPUT
    assert "models:/videobert@nope" in capsys.readouterr().err
    assert embed.main([*config, "--set", "embed.model_uri=models:/videobert/9"]) == EXIT_MISSING_INPUT
    assert embed.main([*config, "--set", "embed.model_uri=videobert"]) == 2
    assert "embed.model_uri" in capsys.readouterr().err
    # The codebook was fit on seed-0 random S3D features: another encoder would give meaningless words.
    assert embed.main([*config, "--set", "encoder.seed=1"]) == 2
    assert "s3d-random1-l2" in capsys.readouterr().err
    assert embed.main([*config, "--set", f"source={world.source / 'absent'}"]) == 3


def test_planning_rules() -> None:
    names = ("same", "changed", "failed", "flaky", "legacy", "new")
    listed = [{"video_id": v, "etag": "e1"} for v in names]
    manifest = tables.rows_table(
        [
            {"video_id": "same", "etag": "e1", "status": "ok"},
            {"video_id": "changed", "etag": "e0", "status": "ok"},
            {"video_id": "failed", "etag": "e1", "status": "error", "error_kind": "permanent"},
            {"video_id": "flaky", "etag": "e1", "status": "error", "error_kind": "transient"},
            {"video_id": "legacy", "etag": "e1", "status": "error"},  # from before errors had a kind
        ],
        tables.EMBED_MANIFEST_SCHEMA,
    )
    rows = rows_by_video(manifest)
    todo = videos_to_do(listed, rows, retry_errors=False)
    assert [v["video_id"] for v in todo] == ["changed", "flaky", "legacy", "new"]
    todo = videos_to_do(listed, rows, retry_errors=True)
    assert [v["video_id"] for v in todo] == ["changed", "failed", "flaky", "legacy", "new"]
    # Settings the row was made with count too: another encoder means the video is redone.
    todo = videos_to_do(listed, {"same": {"etag": "e1", "status": "ok", "encoder": "a"}}, False, encoder="b")
    assert [v["video_id"] for v in todo] == list(names)
