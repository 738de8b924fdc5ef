"""Streaming video decode with PyAV: storage object -> fixed-rate square clips of frames.

A video is read as a stream straight from storage (a seekable S3 or local file) and decoded
frame by frame; only the clip being filled is kept in memory, so a two-hour video costs no
more memory than a two-minute one.

Resampling is by timestamps, so variable frame rate is handled: output frame i stands for
time t_i = i / fps after the first frame, and shows the latest source frame whose
presentation time is <= t_i. Clips are non-overlapping runs of `clip_frames` output frames; a
trailing partial clip is dropped. Each output frame is resized (shorter side -> `size`),
centre-cropped square and turned upright by the stream's display-matrix rotation.

Bad input raises `DecodeError` with a reason a person can act on.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Generator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np

from videobert import storage
from videobert.config import DecodeConfig, S3Config

# Bytes PyAV reads per request: large enough that a stream from S3 is not thousands of tiny GETs.
READ_BUFFER = 1 << 20


class DecodeError(Exception):
    """A video that cannot be decoded; `reason` says why in words a person can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class VideoInfo:
    """What a video is, as displayed (width/height after rotation)."""

    duration_s: float
    width: int
    height: int
    fps: float


@dataclass
class Clip:
    """`frames` (T, H, W, 3) uint8 RGB covering [start_s, end_s) of the video."""

    clip_index: int
    start_s: float
    end_s: float
    frames: np.ndarray


def _open(uri: str, s3: S3Config | None) -> tuple[Any, Any]:
    """Open a container and its first video stream; (container, stream) or DecodeError."""
    if storage.is_s3(uri):
        source: Any = storage.open_input(uri, s3)
        size = source.size()
    else:
        if not os.path.isfile(uri):
            raise DecodeError(f"file not found: {uri}")
        source, size = uri, os.path.getsize(uri)
    if size == 0:
        raise DecodeError("empty file (0 bytes)")
    try:
        container = av.open(source, buffer_size=READ_BUFFER)
    except av.FFmpegError as error:
        raise DecodeError(
            f"not a readable video: the container cannot be opened ({_ffmpeg_message(error)}); "
            "the file is not a video or is cut off before its index"
        ) from error
    if not container.streams.video:
        kinds = ", ".join(stream.type for stream in container.streams) or "none"
        container.close()
        raise DecodeError(f"no video stream (streams found: {kinds})")
    return container, container.streams.video[0]


def _ffmpeg_message(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error)


def _rotation(frame: av.VideoFrame, stream: Any) -> int:
    """Counter-clockwise display rotation in degrees, a multiple of 90."""
    degrees = frame.rotation
    if not degrees:
        # Old files written by tools that only set the `rotate` tag (clockwise degrees).
        tag = stream.metadata.get("rotate")
        if tag and re.fullmatch(r"-?\d+", tag.strip()):
            degrees = -int(tag)
    return int(round(degrees / 90.0)) * 90 % 360


def _square(frame: av.VideoFrame, size: int, rotation: int) -> np.ndarray:
    """Resize so the shorter side is `size`, centre-crop square, turn upright: (size, size, 3)."""
    width, height = frame.width, frame.height
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    image = frame.to_ndarray(width=new_width, height=new_height, format="rgb24")
    top, left = (new_height - size) // 2, (new_width - size) // 2
    image = image[top : top + size, left : left + size]
    if rotation:
        # np.rot90 turns counter-clockwise, like the display matrix.
        image = np.rot90(image, k=rotation // 90)
    return np.ascontiguousarray(image)


def _header_duration(container: Any, stream: Any) -> float | None:
    """The video stream's duration as the container states it, when it does."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION")  # Matroska writes it per stream as HH:MM:SS.fff
    if tag:
        match = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d+)?)", tag.strip())
        if match:
            hours, minutes, seconds = match.groups()
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    if container.duration is not None and len(container.streams) == 1:
        return container.duration / av.time_base
    return None


def _stream_fps(stream: Any) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _frame_time(frame: av.VideoFrame, stream: Any) -> Fraction | None:
    if frame.pts is None:
        return None
    return frame.pts * (frame.time_base or stream.time_base)


def _frame_duration(frame: av.VideoFrame, stream: Any) -> Fraction:
    """How long a frame is shown: its own duration, else one period of the average rate."""
    time_base = frame.time_base or stream.time_base
    if frame.duration and time_base:
        return frame.duration * time_base
    rate = stream.average_rate or stream.guessed_rate
    return Fraction(1) / Fraction(rate) if rate else Fraction(1, 25)


def iter_clips(
    uri: str, decode: DecodeConfig, s3: S3Config | None = None
) -> Generator[Clip, None, VideoInfo]:
    """Decode `uri` as a stream of clips (see module doc). Lazily: nothing is decoded up front.

    When exhausted, the generator returns the video's `VideoInfo` (StopIteration.value).
    Raises `DecodeError` for every kind of bad input, also midway through the video.
    """
    step = Fraction(decode.fps).limit_denominator(1_000_000) ** -1  # seconds between output frames
    container, stream = _open(uri, s3)
    with container:
        origin: Fraction | None = None  # time of the first frame; output times count from here
        previous: av.VideoFrame | None = None  # latest decoded frame, shown until the next one
        previous_time = Fraction(0)
        previous_image: np.ndarray | None = None  # `previous` converted, when already used
        rotation = 0
        width = height = 0
        frames: list[np.ndarray] = []
        clip_index = 0
        next_output = 0  # index of the next output frame to fill
        decoded = 0

        def fill_until(until: Fraction) -> Generator[Clip, None, None]:
            """Emit `previous` for every output time before `until`; yield clips as they fill."""
            nonlocal next_output, previous_image, clip_index, frames
            while next_output * step < until:
                if previous_image is None:
                    previous_image = _square(previous, decode.size, rotation)
                frames.append(previous_image)
                next_output += 1
                if len(frames) == decode.clip_frames:
                    start = clip_index * decode.clip_frames * step
                    yield Clip(
                        clip_index,
                        float(start),
                        float(start + decode.clip_frames * step),
                        np.stack(frames),
                    )
                    clip_index += 1
                    frames = []
                    if decode.max_clips is not None and clip_index >= decode.max_clips:
                        return

        def done() -> bool:
            return decode.max_clips is not None and clip_index >= decode.max_clips

        try:
            for frame in container.decode(stream):
                time = _frame_time(frame, stream)
                if time is None:  # no timestamp: assume it follows the previous frame
                    time = previous_time + _frame_duration(previous, stream) if previous else Fraction(0)
                if origin is None:
                    # Count from the stream's start (as read_frame does), or the first frame if earlier.
                    stated_start = (
                        stream.start_time * stream.time_base if stream.start_time is not None else None
                    )
                    origin = min(time, stated_start) if stated_start is not None else time
                    rotation = _rotation(frame, stream)
                    width, height = (
                        (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
                    )
                time -= origin
                if previous is not None and time <= previous_time:
                    continue  # out-of-order or duplicate timestamp: keep the earlier frame
                decoded += 1
                if previous is not None:
                    yield from fill_until(time)
                    if done():
                        break
                previous, previous_time, previous_image = frame, time, None
        except av.FFmpegError as error:
            at = float(previous_time) if previous is not None else 0.0
            raise DecodeError(
                f"decode failed at {at:.2f} s after {decoded} frames: {_ffmpeg_message(error)} "
                "(the file is corrupted or cut off)"
            ) from error

        if previous is None:
            raise DecodeError("no decodable video frames")
        end = previous_time + _frame_duration(previous, stream)
        stated = _header_duration(container, stream)
        if not done():
            yield from fill_until(end)
            # A cut-off file often decodes cleanly up to the cut: compare with what the header says.
            if stated is not None and float(end) < stated - max(1.0, 0.05 * stated):
                raise DecodeError(
                    f"truncated: frames end at {float(end):.2f} s but the container says {stated:.2f} s"
                )
        duration = stated if stated is not None and done() else float(end)
        return VideoInfo(duration_s=duration, width=width, height=height, fps=_stream_fps(stream))


def probe(uri: str, s3: S3Config | None = None) -> VideoInfo:
    """Duration, displayed size and frame rate, from the header and the first frame."""
    container, stream = _open(uri, s3)
    with container:
        try:
            frame = next(container.decode(stream), None)
        except av.FFmpegError as error:
            raise DecodeError(f"cannot decode the first frame: {_ffmpeg_message(error)}") from error
        if frame is None:
            raise DecodeError("no decodable video frames")
        rotation = _rotation(frame, stream)
        width, height = (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
        duration = _header_duration(container, stream)
        if duration is None and container.duration is not None:
            duration = container.duration / av.time_base
        return VideoInfo(
            duration_s=float(duration or 0.0), width=width, height=height, fps=_stream_fps(stream)
        )


def read_frame(uri: str, time_s: float, size: int, s3: S3Config | None = None) -> np.ndarray:
    """The frame shown at `time_s` (seconds after the first frame) as (size, size, 3) uint8.

    Same geometry as the clips: shorter side resized, centre crop, upright.
    """
    container, stream = _open(uri, s3)
    with container:
        start = stream.start_time or 0
        time_base = stream.time_base
        target = Fraction(time_s).limit_denominator(1_000_000)

        def latest_at_or_before(seek: bool) -> av.VideoFrame | None:
            if seek:
                container.seek(start + math.floor(target / time_base), stream=stream, backward=True)
            chosen = None
            for frame in container.decode(stream):
                time = _frame_time(frame, stream)
                if time is not None and time - start * time_base > target:
                    break
                chosen = frame
            return chosen

        try:
            frame = latest_at_or_before(seek=True)
            if frame is None:  # the seek landed after the target (sparse index): decode from the start
                container.seek(start, stream=stream, backward=True)
                frame = latest_at_or_before(seek=False)
        except av.FFmpegError as error:
            raise DecodeError(f"cannot decode at {time_s:.2f} s: {_ffmpeg_message(error)}") from error
        if frame is None:
            raise DecodeError("no decodable video frames")
        return _square(frame, size, _rotation(frame, stream))
