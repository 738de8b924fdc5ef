"""`videobert embed`: batch inference with a registered model on the shared Ray cluster.

A tiny world: object videos (one of them copied byte for byte), a corrupt file, a codebook fit
on the videos' own features, and two debug-size model versions registered on SQLite with
`champion` on the first. Expected words and embeddings are computed here in one process,
from decoded clips and the model's own layers, not through the stage's code.

The same versions carry their input files (random S3D, codebook, decode settings), so the
registered pyfunc's video interface is tested here too, against the same expectations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import yaml

from pipelines import embed
from pipelines.common import EXIT_MISSING_INPUT
from tests import videos
from videobert import storage, tables
from videobert.codebook import HierarchicalCodebook
from videobert.config import EncoderConfig, ExperimentConfig, load_config
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


# ---- the registered model takes raw video (its `inputs/` artifact) --------------------------


def expected_video(world: World, name: str, clips: slice = slice(None)) -> tuple[list[int], np.ndarray]:
    """Words and embedding by `videobert embed`'s library parts, from the test's own features."""
    words = world.codebook.assign(world.features[name][clips])
    return words.tolist(), embed_videos(world.champion, world.vocab, [words], MAX_SEQ_LEN).embedding[0]


def test_registered_model_predicts_on_raw_video(world: World, s3_bucket: str, tmp_path: Path) -> None:
    """One batch: a local mp4, the same kind of mp4 on S3 (moto), a window, and unreadable
    inputs; each readable row gets embed's words and embedding, each other an error row."""
    import boto3

    use_tracking_uri(world.config.mlflow.tracking_uri)
    bucket = s3_bucket.removeprefix("s3://")
    boto3.client("s3").upload_file(str(world.source / "video1.mp4"), bucket, "clips/video1.mp4")
    (tmp_path / "notes.mp4").write_text("not a video")
    pyfunc = mlflow.pyfunc.load_model("models:/videobert@champion")
    batch = pd.DataFrame(
        {
            "video": [
                str(world.source / "video0.mp4"),
                f"{s3_bucket}/clips/video1.mp4",
                str(world.source / "corrupted.mkv"),
                str(world.source / "video0.mp4"),
                str(tmp_path / "notes.mp4"),
                f"{s3_bucket}/clips/absent.mp4",
            ],
            "start_s": [None, None, None, 2.0, None, None],  # clips are 1 s: a window of clips 2 and 3
            "end_s": [None, None, None, 4.0, None, None],
        }
    )
    out = pyfunc.predict(batch)
    assert list(out.columns) == ["embedding", "cls_embedding", "visual_words", "num_clips", "error"]
    assert len(out) == len(batch)
    for row, (name, clips) in enumerate(
        [("video0.mp4", slice(None)), ("video1.mp4", slice(None)), (None, None), ("video0.mp4", slice(2, 4))]
    ):
        if name is None:
            continue
        words, embedding = expected_video(world, name, clips)
        assert out["error"][row] is None, out["error"][row]
        assert list(out["visual_words"][row]) == words and out["num_clips"][row] == len(words)
        np.testing.assert_allclose(out["embedding"][row], embedding, atol=1e-5)
    assert len(out["visual_words"][0]) == 6 and len(out["visual_words"][3]) == 2
    for row, reason in [(2, "decode:"), (4, "decode: not a readable video"), (5, "")]:
        assert out["error"][row] and out["error"][row].startswith(reason), out["error"][row]
        assert out["embedding"][row] is None and out["visual_words"][row] is None
    assert "absent.mp4" in out["error"][5]


def test_registered_model_still_takes_token_ids(world: World) -> None:
    use_tracking_uri(world.config.mlflow.tracking_uri)
    pyfunc = mlflow.pyfunc.load_model("models:/videobert/1")
    words = world.codebook.assign(world.features["video1.mp4"])
    ids = [CLS, *(world.vocab.video_offset + words).tolist(), SEP]
    out = pyfunc.predict(pd.DataFrame({"input_ids": [ids]}))
    assert {"embedding", "cls_embedding", "alignment_score", "mlm_predictions"} <= set(out.columns)
    with torch.no_grad():
        hidden = world.champion.encode(torch.tensor([ids]), torch.full((1, len(ids)), VIDEO_TYPE))[0]
    np.testing.assert_allclose(out["embedding"][0], hidden.mean(0).numpy(), atol=1e-5)
    # Both forms pass the logged signature as `mlflow models serve` parses a request (the check
    # log_model itself runs; its public wrapper is deprecated).
    from mlflow.models.utils import _validate_serving_input as validate_serving_input

    served = validate_serving_input(
        "models:/videobert/1", json.dumps({"dataframe_records": [{"input_ids": ids}]})
    )
    np.testing.assert_allclose(served["embedding"][0], out["embedding"][0], atol=1e-6)
    video = {"video": str(world.source / "video1.mp4"), "end_s": 2.0}
    served = validate_serving_input("models:/videobert/1", json.dumps({"dataframe_records": [video]}))
    assert (
        served["error"][0] is None
        and list(served["visual_words"][0]) == expected_video(world, "video1.mp4", slice(2))[0]
    )
    with pytest.raises(Exception, match="not both"):
        pyfunc.predict(pd.DataFrame({"input_ids": [ids], "video": ["x.mp4"]}))
    with pytest.raises(Exception, match="expected a `video` column"):
        pyfunc.predict(pd.DataFrame({"start_s": [1.0]}))


def test_registered_model_files_and_cards(world: World, tmp_path: Path) -> None:
    """The version's input files are plain (safetensors and JSON, random S3D as a seed); its
    card names the codebook and how to call predict, and shows metrics once evaluated."""
    from mlflow.artifacts import download_artifacts

    from videobert.registry import record_evaluation

    use_tracking_uri(world.config.mlflow.tracking_uri)
    root = Path(download_artifacts(artifact_uri="models:/videobert/2", dst_path=str(tmp_path)))
    inputs = root / "artifacts" / "inputs"
    encoder = json.loads((inputs / "encoder.json").read_text())
    assert (encoder["weights"], encoder["seed"], encoder["encoder_id"]) == ("random", 0, "s3d-random0-l2")
    assert not (inputs / "encoder.safetensors").exists()
    assert json.loads((inputs / "decode.json").read_text()) == dataclasses.asdict(world.config.decode)
    assert HierarchicalCodebook.load(str(inputs / "codebook")).version == world.codebook.version
    assert [p.name for p in root.rglob("*.pkl")] == ["python_model.pkl"]  # the class, by reference

    client = mlflow.MlflowClient()
    assert "mlflow.pyfunc.load_model" in client.get_registered_model("videobert").description
    card = client.get_model_version("videobert", "2").description
    assert world.codebook.version in card and "Not evaluated yet" in card
    assert 'load_model("models:/videobert/2")' in card and '"video": [' in card and "input_ids" in card
    record_evaluation(
        "videobert",
        "2",
        {"zero_shot_object_top1": 0.75},
        {},
        {"codebook_version": "c", "tokenizer_version": "t"},
    )
    card = client.get_model_version("videobert", "2").description
    assert "| zero_shot_object_top1 | 0.7500 |" in card and "Not evaluated yet" not in card


def test_model_inputs_store_file_weights_and_check_the_encoder(world: World, tmp_path: Path) -> None:
    """A state dict travels as encoder.safetensors; a codebook fit on another encoder carries none;
    an encoder that rebuilds differently is refused."""
    from safetensors.torch import save_file

    from videobert.features import build_s3d
    from videobert.model_inputs import ModelInputs, write_model_inputs

    weights = tmp_path / "s3d.safetensors"
    save_file(build_s3d(EncoderConfig(weights="none", seed=5)).state_dict(), str(weights))
    config = dataclasses.replace(world.config, encoder=EncoderConfig(weights=str(weights)))
    other = write_model_inputs(tmp_path / "other", config, world.codebook.save(str(tmp_path / "cb0")), None)
    assert other["weights"] == "missing" and "s3d-random0-l2" in other["reason"]
    with pytest.raises(ValueError, match="no video encoder"):
        ModelInputs.load(tmp_path / "other").encoder_config()

    codebook = HierarchicalCodebook(
        world.codebook.k,
        world.codebook.depth,
        world.codebook.levels,
        metadata={"encoder": encoder_id(config.encoder)},
    )
    meta = write_model_inputs(tmp_path / "file", config, codebook.save(str(tmp_path / "cb")), None)
    assert meta["weights"] == "file" and (tmp_path / "file" / "encoder.safetensors").exists()
    inputs = ModelInputs.load(tmp_path / "file")
    embedder = inputs.video_embedder(world.champion, world.vocab, MAX_SEQ_LEN)
    (row,) = embedder([{"video_id": "v", "source_uri": str(world.source / "video1.mp4")}])
    assert row["error"] is None and row["num_clips"] == 6
    tampered = dataclasses.replace(inputs, encoder={**inputs.encoder, "state_sha256": "0" * 64})
    with pytest.raises(ValueError, match="not the registered"):
        tampered.video_embedder(world.champion, world.vocab, MAX_SEQ_LEN)


def test_registered_features_model_predicts_on_raw_video(world: World) -> None:
    """A `model.video_input: features` version (CBT) says so (metadata, tag, card) and its video
    interface feeds the S3D features it computes, not only their words, to the model."""
    use_tracking_uri(world.config.mlflow.tracking_uri)
    model = build_model("debug", world.vocab, max_positions=16, seed=3, video_input="features").eval()
    champion = resolve_model_version("models:/videobert/1").metadata
    metadata = {k: champion[k] for k in ("codebook_uri", "codebook_version", "max_seq_len")}
    run_id, _ = start_or_resume_run(world.config, "embed-test-features")
    version = log_and_register_model(run_id, model, world.vocab, metadata, world.config, "videobert-cbt")
    info = resolve_model_version(f"models:/videobert-cbt/{version}")
    assert info.metadata["video_input"] == "features" and info.config.video_input == "features"
    card = mlflow.MlflowClient().get_model_version("videobert-cbt", version).description
    assert "`features`" in card
    out = mlflow.pyfunc.load_model(f"models:/videobert-cbt/{version}").predict(
        pd.DataFrame({"video": [str(world.source / "video0.mp4")]})
    )
    assert out["error"][0] is None, out["error"][0]
    features = world.features["video0.mp4"]
    words = world.codebook.assign(features)
    expected = embed_videos(model, world.vocab, [words], MAX_SEQ_LEN, features=[features]).embedding[0]
    np.testing.assert_allclose(out["embedding"][0], expected, atol=1e-4)


def test_embed_stage_with_a_features_model(ray_cluster, world: World) -> None:
    """`videobert embed` with a `video_input: features` version: decoded videos keep their S3D
    features for the model, reused ones (new.mp4, when the rerun test planted it) read them
    from extract's file; each embedding is the model's over words and features."""
    use_tracking_uri(world.config.mlflow.tracking_uri)
    model = build_model("debug", world.vocab, max_positions=16, seed=4, video_input="features").eval()
    champion = resolve_model_version("models:/videobert/1").metadata
    metadata = {k: champion[k] for k in ("codebook_uri", "codebook_version", "max_seq_len")}
    run_id, _ = start_or_resume_run(world.config, "embed-test-features-stage")
    version = log_and_register_model(
        run_id, model, world.vocab, metadata, world.config, "videobert-cbt-embed"
    )
    embed_settings = dataclasses.replace(
        world.config.embed, model_uri=f"models:/videobert-cbt-embed/{version}"
    )
    summary = embed.run(dataclasses.replace(world.config, embed=embed_settings))
    assert summary.ok >= 3 and summary.error == 1
    rows = by_name(tables.read_embeddings(summary.directory))
    planted = {"new.mp4": "video1.mp4"}  # see test_embed_champion_then_incremental_reruns
    for name, row in rows.items():
        features = world.features[planted.get(name, name.removeprefix("copy_of_"))]
        words = world.codebook.assign(features)
        assert row["visual_words"] == words.tolist()
        expected = embed_videos(model, world.vocab, [words], MAX_SEQ_LEN, features=[features]).embedding[0]
        np.testing.assert_allclose(row["embedding"], expected, atol=1e-4)
