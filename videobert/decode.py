"""Streaming video decode with PyAV: storage object -> fixed-rate square clips of frames.

A video is read as a stream straight from storage (a seekable S3 or local file) and decoded
frame by frame; only the clip being filled is kept in memory, so a two-hour video costs no
more memory than a two-minute one.

Resampling is by timestamps, so variable frame rate is handled: output frame i stands for
time t_i = i / fps after the first frame, and shows the latest source frame whose
presentation time is <= t_i. Clips are non-overlapping runs of `clip_frames` output frames; a
trailing partial clip is dropped. Each output frame is centre-cropped square, the square
resized to `size` and turned upright by the stream's display-matrix rotation.

The cost of one video is bounded by `DecodeConfig`: frame size (`max_pixels`), shape
(`max_aspect_ratio`), length (`max_duration_s`), clips (`clip_limit`) and timestamp gaps
(`max_gap_s`). Each is checked against the container header before anything is decoded and
again against what is decoded, since a header can lie; the decoder itself is told `max_pixels`,
so it refuses to allocate a larger frame. A video that breaks a bound is a `DecodeError` whose
reason names the setting to raise.

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
import av.filter
import numpy as np
from av.video.reformatter import VideoReformatter

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


def _open(uri: str, s3: S3Config | None, decode: DecodeConfig) -> tuple[Any, Any]:
    """Open a container and its first video stream; (container, stream) or DecodeError.

    The decoder gets `decode.max_pixels` as its own limit, both while `av.open` probes the
    stream and for the decode proper: it then refuses (an error, not an allocation) a frame
    larger than that, whatever the header said.
    """
    if storage.is_s3(uri):
        try:
            source: Any = storage.open_input(uri, s3)
        except FileNotFoundError as error:  # as for a local path: the file's fault, not the storage's
            raise DecodeError(f"file not found: {uri}") from error
        size = source.size()
    else:
        if not os.path.isfile(uri):
            raise DecodeError(f"file not found: {uri}")
        source, size = uri, os.path.getsize(uri)
    if size == 0:
        raise DecodeError("empty file (0 bytes)")
    limit = {"max_pixels": str(decode.max_pixels)}
    try:
        container = av.open(source, buffer_size=READ_BUFFER, options=limit)
    except av.FFmpegError as error:
        raise DecodeError(
            f"not a readable video: the container cannot be opened ({_ffmpeg_message(error)}); "
            "the file is not a video or is cut off before its index"
        ) from error
    if not container.streams.video:
        kinds = ", ".join(stream.type for stream in container.streams) or "none"
        container.close()
        raise DecodeError(f"no video stream (streams found: {kinds})")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        container.close()
        raise DecodeError("no decoder for the video stream's codec in this FFmpeg build")
    stream.codec_context.options = {**stream.codec_context.options, **limit}
    return container, stream


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


class _Square:
    """Decoded frames -> (size, size, 3) uint8 RGB: centre-crop square, resize, turn upright.

    Crop first, then scale. The crop is libavfilter's `crop`, which only moves pointers into the
    decoded frame, and one swscale pass turns that square into size x size RGB, so nothing larger
    than the decoded frame is ever made, whatever its shape (scaling the whole frame first turned
    a 2x8192 frame into 224x917504 pixels). The result is a copy that keeps no frame alive.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._crop_for: tuple[int, int, str] | None = None  # (width, height, pixel format)
        self._crop: Any = None  # the filter graph that crops frames of that kind
        self._scaler = VideoReformatter()  # keeps its swscale context from frame to frame

    def __call__(self, frame: av.VideoFrame, rotation: int) -> np.ndarray:
        square = self._centre_square(frame)
        # Bilinear, one thread: the defaults of `VideoFrame.to_ndarray`, less the thread pool.
        scaled = self._scaler.reformat(square, width=self.size, height=self.size, format="rgb24", threads=1)
        image = scaled.to_ndarray()
        if rotation:
            # np.rot90 turns counter-clockwise, like the display matrix.
            image = np.rot90(image, k=rotation // 90)
        return np.array(image, order="C")  # a copy: `image` may be a view into a decoder's frame

    def _centre_square(self, frame: av.VideoFrame) -> av.VideoFrame:
        width, height = frame.width, frame.height
        if width == height:
            return frame
        kind = (width, height, frame.format.name)
        if kind != self._crop_for:
            self._crop, self._crop_for = _crop_graph(frame), kind
        self._crop.vpush(frame)
        return self._crop.vpull()


def _crop_graph(frame: av.VideoFrame) -> Any:
    """A filter graph that cuts the centre square out of frames like `frame` (no copy)."""
    width, height, pixels = frame.width, frame.height, frame.format
    side = min(width, height)
    # Offsets on the chroma grid of subsampled formats (2 px for 4:2:0), so the chroma planes stay
    # aligned with luma; the square is then up to one pixel off centre.
    step_x = max(1, 256 // max(1, pixels.chroma_width(256)))
    step_y = max(1, 256 // max(1, pixels.chroma_height(256)))
    left = (width - side) // 2 // step_x * step_x
    top = (height - side) // 2 // step_y * step_y
    graph = av.filter.Graph()
    source = graph.add_buffer(width=width, height=height, format=pixels, time_base=Fraction(1, 1000))
    crop = graph.add("crop", f"w={side}:h={side}:x={left}:y={top}:exact=1")
    sink = graph.add("buffersink")
    source.link_to(crop)
    crop.link_to(sink)
    graph.configure()
    return graph


# ---- bounds on what one video may cost -------------------------------------------------------


def _check_size(width: int, height: int, decode: DecodeConfig, where: str) -> None:
    """DecodeError when a width x height frame breaks decode.max_pixels or decode.max_aspect_ratio."""
    if width <= 0 or height <= 0:
        return  # not known
    if width * height > decode.max_pixels:
        raise DecodeError(
            f"frame {width}x{height} {where} exceeds decode.max_pixels {decode.max_pixels} "
            f"({width * height} pixels); raise decode.max_pixels to decode it"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > decode.max_aspect_ratio:
        raise DecodeError(
            f"frame {width}x{height} {where} exceeds decode.max_aspect_ratio {decode.max_aspect_ratio:g} "
            f"({ratio:.1f}:1); raise decode.max_aspect_ratio to decode it"
        )


def _check_header(container: Any, stream: Any, decode: DecodeConfig) -> float | None:
    """Check the bounds against what the container states, before decoding; its duration or None."""
    context = stream.codec_context
    _check_size(context.width, context.height, decode, "in the header")
    stated = _header_duration(container, stream)
    if stated is None:
        return None
    if stated > decode.max_duration_s:
        raise DecodeError(
            f"duration {stated:.2f} s in the header exceeds decode.max_duration_s "
            f"{decode.max_duration_s:g}; raise decode.max_duration_s to decode it"
        )
    clips = math.floor(stated * decode.fps / decode.clip_frames)
    if clips > decode.clip_limit and (decode.max_clips is None or decode.max_clips > decode.clip_limit):
        raise DecodeError(
            f"{clips} clips by the header's duration ({stated:.2f} s) exceed decode.clip_limit "
            f"{decode.clip_limit}; raise decode.clip_limit, or set decode.max_clips to keep the first clips"
        )
    return stated


def _slack(stated: float) -> float:
    """How far decoded frames may end before, or run past, the duration the header states."""
    return max(1.0, 0.05 * stated)


def _check_time(
    time: Fraction, previous_time: Fraction | None, stated: float | None, decode: DecodeConfig
) -> None:
    """DecodeError when a frame at `time` (after one at `previous_time`, if any) breaks a time bound.

    A gap longer than max_gap_s is an error rather than the end of the video: ending there
    would record a video `ok` that lost everything after the gap, and filling it (as before)
    let one bogus timestamp turn a 1 KB file into hundreds of clips of one repeated frame.
    """
    gap = time - (previous_time or 0)
    if gap > decode.max_gap_s:
        after = "the start" if previous_time is None else f"the frame at {float(previous_time):.2f} s"
        raise DecodeError(
            f"gap of {float(gap):.2f} s between {after} and the frame at {float(time):.2f} s exceeds "
            f"decode.max_gap_s {decode.max_gap_s:g}; raise decode.max_gap_s to fill it with the last frame"
        )
    if time > decode.max_duration_s:
        raise DecodeError(
            f"frame at {float(time):.2f} s exceeds decode.max_duration_s {decode.max_duration_s:g}; "
            "raise decode.max_duration_s to decode it"
        )
    if stated is not None and time > stated + _slack(stated):
        raise DecodeError(
            f"bogus timestamps: a frame at {float(time):.2f} s but the container says {stated:.2f} s"
        )


def _decode_failure(
    error: Exception, stream: Any, decode: DecodeConfig, what: str, decoded: int
) -> DecodeError:
    """The DecodeError for an FFmpeg error while decoding: a broken bound when that is the cause."""
    width, height = stream.codec_context.width, stream.codec_context.height
    try:
        # The decoder refuses a frame over max_pixels; it has set its size by then.
        _check_size(width, height, decode, "in the bitstream")
    except DecodeError as bound:
        return bound
    cause = "the file is corrupted or cut off"
    if decoded == 0 and (width <= 0 or height <= 0):
        # Probing drops a frame size over max_pixels, so a refused header frame ends up here.
        cause += f", or its frames exceed decode.max_pixels {decode.max_pixels}"
    return DecodeError(f"{what}: {_ffmpeg_message(error)} ({cause})")


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
    Raises `DecodeError` for every kind of bad input, also midway through the video, and for a
    video that breaks one of the bounds in `decode` (before decoding when its header does).
    """
    step = Fraction(decode.fps).limit_denominator(1_000_000) ** -1  # seconds between output frames
    container, stream = _open(uri, s3, decode)
    with container:
        stated = _check_header(container, stream, decode)
        header_size = f"{stream.codec_context.width}x{stream.codec_context.height}"
        square = _Square(decode.size)
        origin: Fraction | None = None  # time of the first frame; output times count from here
        previous: av.VideoFrame | None = None  # latest decoded frame, shown until the next one
        previous_time = Fraction(0)
        previous_image: np.ndarray | None = None  # `previous` converted, when already used
        rotation = 0
        width = height = 0
        checked = (0, 0)  # the last frame size checked against the bounds
        frames: list[np.ndarray] = []
        clip_index = 0
        next_output = 0  # index of the next output frame to fill
        decoded = 0

        def fill_until(until: Fraction) -> Generator[Clip, None, None]:
            """Emit `previous` for every output time before `until`; yield clips as they fill."""
            nonlocal next_output, previous_image, clip_index, frames
            while next_output * step < until:
                if previous_image is None:
                    previous_image = square(previous, rotation)
                frames.append(previous_image)
                next_output += 1
                if len(frames) == decode.clip_frames:
                    if clip_index >= decode.clip_limit:
                        raise DecodeError(
                            f"more than decode.clip_limit {decode.clip_limit} clips "
                            f"({float(next_output * step):.2f} s decoded); raise decode.clip_limit, "
                            "or set decode.max_clips to keep the first clips"
                        )
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
                if (frame.width, frame.height) != checked:
                    # What is decoded can differ from the header (or change midway): check it too.
                    _check_size(frame.width, frame.height, decode, f"as decoded (header: {header_size})")
                    checked = (frame.width, frame.height)
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
                _check_time(time, previous_time if previous is not None else None, stated, decode)
                decoded += 1
                if previous is not None:
                    yield from fill_until(time)
                    if done():
                        break
                previous, previous_time, previous_image = frame, time, None
        except av.FFmpegError as error:
            at = float(previous_time) if previous is not None else 0.0
            raise _decode_failure(
                error, stream, decode, f"decode failed at {at:.2f} s after {decoded} frames", decoded
            ) from error

        if previous is None:
            raise DecodeError("no decodable video frames")
        shown = _frame_duration(previous, stream)
        end = previous_time + shown
        if not done():
            if shown > decode.max_gap_s:
                raise DecodeError(
                    f"the last frame (at {float(previous_time):.2f} s) lasts {float(shown):.2f} s, more than "
                    f"decode.max_gap_s {decode.max_gap_s:g}; raise decode.max_gap_s to fill it with that frame"
                )
            yield from fill_until(end)
            # A cut-off file often decodes cleanly up to the cut: compare with what the header says.
            if stated is not None and float(end) < stated - _slack(stated):
                raise DecodeError(
                    f"truncated: frames end at {float(end):.2f} s but the container says {stated:.2f} s"
                )
        duration = stated if stated is not None and done() else float(end)
        return VideoInfo(duration_s=duration, width=width, height=height, fps=_stream_fps(stream))


def probe(uri: str, s3: S3Config | None = None, decode: DecodeConfig | None = None) -> VideoInfo:
    """Duration, displayed size and frame rate, from the header and the first frame.

    `decode` gives the bounds (default: `DecodeConfig()`'s) the header and that frame must keep.
    """
    decode = decode or DecodeConfig()
    container, stream = _open(uri, s3, decode)
    with container:
        _check_header(container, stream, decode)
        try:
            frame = next(container.decode(stream), None)
        except av.FFmpegError as error:
            raise _decode_failure(error, stream, decode, "cannot decode the first frame", 0) from error
        if frame is None:
            raise DecodeError("no decodable video frames")
        _check_size(frame.width, frame.height, decode, "as decoded")
        rotation = _rotation(frame, stream)
        width, height = (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
        duration = _header_duration(container, stream)
        if duration is None and container.duration is not None:
            duration = container.duration / av.time_base
        return VideoInfo(
            duration_s=float(duration or 0.0), width=width, height=height, fps=_stream_fps(stream)
        )


def read_frame(
    uri: str, time_s: float, size: int, s3: S3Config | None = None, decode: DecodeConfig | None = None
) -> np.ndarray:
    """The frame shown at `time_s` (seconds after the first frame) as (size, size, 3) uint8.

    Same geometry as the clips: centre square, resized, upright. `decode` gives the bounds on
    frame size (default: `DecodeConfig()`'s); its own `size` is not used.
    """
    decode = decode or DecodeConfig()
    container, stream = _open(uri, s3, decode)
    with container:
        context = stream.codec_context
        _check_size(context.width, context.height, decode, "in the header")
        start = stream.start_time or 0
        time_base = stream.time_base
        target = Fraction(time_s).limit_denominator(1_000_000)

        def latest_at_or_before(seek: bool) -> av.VideoFrame | None:
            if seek:
                container.seek(start + math.floor(target / time_base), stream=stream, backward=True)
            chosen = None
            for frame in container.decode(stream):
                _check_size(frame.width, frame.height, decode, "as decoded")
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
            raise _decode_failure(error, stream, decode, f"cannot decode at {time_s:.2f} s", 0) from error
        if frame is None:
            raise DecodeError("no decodable video frames")
        return _Square(size)(frame, _rotation(frame, stream))
