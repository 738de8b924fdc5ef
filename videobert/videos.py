"""The video stages that extract and embed share, as plain Python (Ray-free).

Both stages run the same plan over the videos under `source` (the Ray Data glue is in
pipelines/extract.py and pipelines/embed.py):

    list_videos(config)          every video with its ETag and transcript sidecar
    videos_to_do(...)            those whose manifest row is not up to date (one skip rule)
    decode_video(video, ...)     a decode task: a row per clip, then one END row (status, info)
    ClipFeatures / ClipWords     an actor's batch method: S3D features (and visual words)
    ClipGatherer                 on the driver: regroups a video's rows (they arrive in any order)
    decoded_videos_here(...)     the same decode -> actor -> regroup chain in this process, no Ray
                                 (the registered model's video interface)
    ManifestCommitter            writes a video's output file first, its manifest row after it
    VideoStageSummary            what the run did, with one report()

A bad file becomes an END row with status `error`, never an exception that stops the run.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from videobert import storage, tables
from videobert.config import DecodeConfig, EncoderConfig, ExperimentConfig, S3Config
from videobert.decode import DecodeError, iter_clips
from videobert.results import VideoStageSummary

log = logging.getLogger(__name__)

CLIP, END = "clip", "end"


# ---- listing and the skip rule -------------------------------------------------------------


def list_videos(config: ExperimentConfig) -> list[dict[str, Any]]:
    """Every video under `source` with its size, ETag and transcript sidecar (if any)."""
    everything = storage.list_objects(config.source, config.s3)
    by_uri = {obj.uri: obj for obj in everything}
    video_ext = {e.lower().lstrip(".") for e in config.decode.extensions}
    videos = []
    for obj in everything:
        base, dot, ext = obj.uri.rpartition(".")
        if not dot or ext.lower() not in video_ext:
            continue
        # Sidecar: same stem, first matching transcript extension (either case).
        transcript = next(
            (
                candidate
                for t_ext in config.decode.transcript_extensions
                for candidate in (f"{base}.{t_ext}", f"{base}.{t_ext.upper()}")
                if candidate in by_uri
            ),
            None,
        )
        videos.append(
            {
                "video_id": tables.video_id(obj.uri),
                "source_uri": obj.uri,
                "etag": obj.etag,
                "size": obj.size,
                "transcript_uri": transcript,
            }
        )
    return videos


def rows_by_video(manifest: pa.Table) -> dict[str, dict[str, Any]]:
    """video_id -> its current manifest row."""
    return {row["video_id"]: row for row in manifest.to_pylist()}


def is_up_to_date(
    row: dict[str, Any] | None, video: dict[str, Any], retry_errors: bool, **expected: Any
) -> bool:
    """The one skip rule: the manifest row is for this very object (same ETag) and made with
    the `expected` settings (e.g. encoder), and it is `ok`, or a permanent error (the object
    fails the same way every time) while `retry_errors` is off. Transient errors (storage
    time-outs, a killed worker) and rows from before errors had a kind are always retried."""
    if row is None or row["etag"] != video["etag"]:
        return False
    if any(row.get(name) != value for name, value in expected.items()):
        return False
    if row["status"] == "ok":
        return True
    return row.get("error_kind") == tables.PERMANENT and not retry_errors


def videos_to_do(
    videos: list[dict[str, Any]],
    manifest: dict[str, dict[str, Any]],
    retry_errors: bool,
    **expected: Any,
) -> list[dict[str, Any]]:
    """The videos whose manifest row is not up to date (see `is_up_to_date`)."""
    return [v for v in videos if not is_up_to_date(manifest.get(v["video_id"]), v, retry_errors, **expected)]


# ---- the decode task -------------------------------------------------------------------------


def clip_window(video: dict[str, Any], decode: DecodeConfig) -> tuple[DecodeConfig, float, float]:
    """(decode settings, start, end) for a video that may name a window (`start_s`, `end_s`).

    A clip belongs to the window when its middle does. Decoding stops after the window's last
    clip (through `max_clips`), so a window near the start of a long video costs little.
    """
    start = float(video.get("start_s") or 0.0)
    end = video.get("end_s")
    if end is None:
        return decode, start, math.inf
    clips = max(1, math.ceil(float(end) / decode.clip_seconds - 0.5))  # middles before `end`
    return replace(decode, max_clips=min(clips, decode.max_clips or clips)), start, float(end)


def in_window(clip_start: float, clip_end: float, window_start: float, window_end: float) -> bool:
    """A clip belongs to a window when its middle does."""
    return window_start <= (clip_start + clip_end) / 2 < window_end


def decode_video(video: dict[str, Any], decode: DecodeConfig, s3: S3Config) -> Iterator[dict[str, Any]]:
    """One video -> a row per clip (frames as raw bytes), then one END row with status and info.

    `video` may name a window in seconds (`start_s`, `end_s`, see `clip_window`): only its clips
    are emitted. Every failure ends as an END row with status error: the run goes on.
    """
    base = {"video_id": video["video_id"], "start_s": 0.0, "end_s": 0.0}
    emitted = 0
    info: dict[str, Any] = {"status": "ok", "error": None, "error_kind": None}
    decode, window_start, window_end = clip_window(video, decode)
    clips = iter_clips(video["source_uri"], decode, s3)
    try:
        while True:
            try:
                clip = next(clips)
            except StopIteration as stop:
                video_info = stop.value
                info.update(
                    duration_s=video_info.duration_s,
                    width=video_info.width,
                    height=video_info.height,
                    fps=video_info.fps,
                )
                break
            if not in_window(clip.start_s, clip.end_s, window_start, window_end):
                continue
            yield {
                **base,
                "kind": CLIP,
                "clip_index": clip.clip_index,
                "start_s": clip.start_s,
                "end_s": clip.end_s,
                "frames": clip.frames.tobytes(),
                "info": "",
            }
            emitted += 1
    except DecodeError as error:  # the file itself: not a video, over a bound
        info.update(status="error", error=f"decode: {error.reason}", error_kind=tables.PERMANENT)
    except storage.StorageError as error:  # the storage, not the file: try again next run
        info.update(status="error", error=f"read: {error}", error_kind=tables.TRANSIENT)
    except Exception as error:  # unforeseen, but this file's doing: still a row, with enough to debug
        reason = f"decode: unexpected {type(error).__name__}: {error}"
        info.update(status="error", error=reason, error_kind=tables.PERMANENT)
        log.warning("unexpected error decoding %s:\n%s", video["source_uri"], traceback.format_exc())
    if info["status"] == "ok" and emitted == 0:
        clip = f"{decode.clip_seconds:.2f} s at {decode.fps:g} fps"
        if window_start or window_end < math.inf:
            reason = f"no clip ({clip}) has its middle in [{window_start:g}, {window_end:g}) s"
        else:
            reason = f"shorter than one clip ({clip})"
        info.update(status="error", error=f"decode: {reason}", error_kind=tables.PERMANENT)
    info["emitted"] = emitted
    yield {**base, "kind": END, "clip_index": -1, "frames": b"", "info": json.dumps(info)}


# ---- actor batch methods ---------------------------------------------------------------------


class ClipFeatures:
    """Holds one S3D encoder (built once per actor) and turns clip rows into features.

    END rows pass through untouched; a failed forward marks its clips with an error.
    """

    def __init__(self, encoder: EncoderConfig, decode: DecodeConfig, s3: S3Config) -> None:
        from videobert.features import ClipEncoder

        self.encoder = ClipEncoder(encoder, s3=s3)
        self.clip_shape = (decode.clip_frames, decode.size, decode.size, 3)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["video_id"])
        features = np.zeros((rows, tables.FEATURE_DIM), np.float32)
        errors = np.array([""] * rows, dtype=object)
        clip_rows = [i for i in range(rows) if batch["kind"][i] == CLIP]
        if clip_rows:
            try:
                frames = np.stack(
                    [np.frombuffer(batch["frames"][i], np.uint8).reshape(self.clip_shape) for i in clip_rows]
                )
                features[clip_rows] = self.encoder(frames)
            except Exception as error:  # a failed forward marks its clips' videos as errors
                errors[clip_rows] = f"features: {type(error).__name__}: {error}"
        return {
            "video_id": batch["video_id"],
            "kind": batch["kind"],
            "clip_index": batch["clip_index"],
            "start_s": batch["start_s"],
            "end_s": batch["end_s"],
            "feature": features,
            "error": errors,
            "info": batch["info"],
        }


class ClipWords(ClipFeatures):
    """ClipFeatures plus a codebook: clip rows leave with a visual word instead of a feature."""

    def __init__(
        self,
        encoder: EncoderConfig,
        decode: DecodeConfig,
        s3: S3Config,
        codebook_uri: str,
        keep_features: bool = False,
    ) -> None:
        from videobert.codebook import HierarchicalCodebook, default_device

        super().__init__(encoder, decode, s3)
        self.codebook = HierarchicalCodebook.load(codebook_uri, s3).to(default_device())
        self.keep_features = keep_features  # for a model that takes clip features (video_input)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = super().__call__(batch)
        # Only the words travel on (4 bytes a clip instead of 4 KiB), unless the model takes the
        # features too; then as float16, as extract stores them.
        features = out.pop("feature")
        if self.keep_features:
            out["feature"] = features.astype(np.float16)
        words = np.full(len(features), -1, np.int32)
        good = [i for i in range(len(words)) if out["kind"][i] == CLIP and not out["error"][i]]
        if good:
            try:
                # Through float16 as extract stores them, so a video gets the words tokenize gave it.
                words[good] = self.codebook.assign(features[good].astype(np.float16))
            except Exception as error:  # its clips' videos become error rows
                out["error"][good] = f"words: {type(error).__name__}: {error}"
        out["visual_word"] = words
        return out


# ---- regrouping and committing on the driver -------------------------------------------------


@dataclass
class DecodedVideo:
    """All the rows of one video, regrouped: its END info and its clip rows by clip_index."""

    video_id: str
    end: dict[str, Any]
    clips: dict[int, dict[str, Any]]

    @property
    def error(self) -> str | None:
        """Why the video failed: its decode error first, else its clips' first error."""
        if self.end["status"] != "ok":
            return self.end["error"]
        clip_errors = sorted({str(c["error"]) for c in self.clips.values() if c.get("error")})
        return clip_errors[0] if clip_errors else None

    @property
    def error_kind(self) -> str | None:
        """permanent or transient (see tables.ERROR_KINDS); None when the video is ok.
        A failed forward pass (e.g. out of GPU memory) is the worker's trouble: transient."""
        if self.error is None:
            return None
        return self.end.get("error_kind") or tables.TRANSIENT

    def ordered_clips(self) -> list[dict[str, Any]]:
        return [self.clips[i] for i in sorted(self.clips)]

    def visual_words(self) -> np.ndarray:
        """The video's words in clip order (clip rows from `ClipWords`)."""
        return np.array([int(clip["visual_word"]) for clip in self.ordered_clips()], np.int64)

    def clip_features(self) -> np.ndarray:
        """The video's clip features [clips, dim] in clip order (`ClipWords(keep_features=True)`)."""
        return np.stack([np.asarray(clip["feature"], np.float16) for clip in self.ordered_clips()])


class ClipGatherer:
    """Regroups rows by video: a video is complete once its END row and all its clip rows arrived.

    They arrive in any order (a video's clips are spread over the actors).
    """

    def __init__(self) -> None:
        self.clips: dict[str, dict[int, dict[str, Any]]] = {}
        self.ends: dict[str, dict[str, Any]] = {}

    def add(self, row: dict[str, Any]) -> DecodedVideo | None:
        """Take one row; returns the video when it is complete."""
        vid = str(row["video_id"])
        if row["kind"] == END:
            self.ends[vid] = json.loads(row["info"])
        else:
            self.clips.setdefault(vid, {})[int(row["clip_index"])] = row
        end = self.ends.get(vid)
        if end is not None and len(self.clips.get(vid, {})) == end["emitted"]:
            del self.ends[vid]
            return DecodedVideo(vid, end, self.clips.pop(vid, {}))
        return None

    def add_batch(self, batch: dict[str, np.ndarray]) -> Iterator[DecodedVideo]:
        """Take a batch of rows (columns); yields each video it completes."""
        for i in range(len(batch["video_id"])):
            complete = self.add({name: column[i] for name, column in batch.items()})
            if complete is not None:
                yield complete

    def leftovers(self, stage: str) -> list[DecodedVideo]:
        """Videos whose rows never all arrived (should not happen), each with an error END info."""
        left = []
        for vid in sorted(set(self.ends) | set(self.clips)):
            got = len(self.clips.get(vid, {}))
            want = self.ends.get(vid, {}).get("emitted", "?")
            error = f"{stage}: incomplete results ({got} of {want} clips)"
            left.append(
                DecodedVideo(vid, {"status": "error", "error": error, "error_kind": tables.TRANSIENT}, {})
            )
        self.clips, self.ends = {}, {}
        return left


# Columns that say when and by whom, not what: a row that differs only in them is not news.
BOOKKEEPING_COLUMNS = frozenset({"run_id", "updated_at"})


def same_row(new: dict[str, Any], current: dict[str, Any] | None) -> bool:
    """Whether committing `new` would change nothing but bookkeeping in `current`."""
    if current is None:
        return False
    return all(current.get(k) == v for k, v in new.items() if k not in BOOKKEEPING_COLUMNS)


class ManifestCommitter:
    """Commits one video at a time: its output file first (atomic, deterministic name), then
    its manifest row, buffered and upserted every `flush_every` videos. Readers go through the
    manifest, so a kill at any point leaves only committed work visible. A row equal to the
    video's `current` one (a transient error that failed the same way again) is not rewritten:
    a rerun over unchanged inputs writes nothing."""

    def __init__(
        self,
        upsert_rows: Callable[[list[dict[str, Any]]], None],
        flush_every: int,
        summary: VideoStageSummary,
        s3: S3Config,
        current: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.upsert_rows = upsert_rows
        self.flush_every = flush_every
        self.summary = summary
        self.s3 = s3
        self.current = current or {}
        self.pending_rows: list[dict[str, Any]] = []

    def commit(
        self,
        video: dict[str, Any],
        manifest_row: dict[str, Any],
        output_uri: str,
        output: pa.Table | None,
        error: str | None,
        clips: int = 0,
    ) -> None:
        """`output` is written to `output_uri` when the video is ok; on error any older file
        there is removed (a video that was ok before and is bad now keeps no stale output)."""
        if error is None:
            storage.write_parquet(output, output_uri, self.s3)
            self.summary.ok += 1
            self.summary.clips += clips
        else:
            storage.delete(output_uri, self.s3)
            self.summary.error += 1
            self.summary.errors[video["source_uri"]] = error
            log.warning("%s: %s", video["source_uri"], error)
        if not same_row(manifest_row, self.current.get(video["video_id"])):
            self.pending_rows.append(manifest_row)
        if len(self.pending_rows) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.pending_rows:
            self.upsert_rows(self.pending_rows)
            self.pending_rows = []


# ---- extract's outputs -----------------------------------------------------------------------


def features_table(video: DecodedVideo) -> pa.Table:
    """A video's clip features as stored in features/<video_id>.parquet (float16)."""
    clips = video.ordered_clips()
    return pa.table(
        {
            "video_id": [video.video_id] * len(clips),
            "clip_index": [int(c["clip_index"]) for c in clips],
            "start_s": [float(c["start_s"]) for c in clips],
            "end_s": [float(c["end_s"]) for c in clips],
            "feature": [np.asarray(c["feature"]).astype(np.float16) for c in clips],
        },
        schema=tables.FEATURES_SCHEMA,
    )


def extract_manifest_row(
    video: dict[str, Any], decoded: DecodedVideo, encoder: str, run_id: str
) -> dict[str, Any]:
    """The `videos/` manifest row of one extracted (or failed) video."""
    error = decoded.error
    row = {
        **{k: video[k] for k in ("video_id", "source_uri", "etag", "size", "transcript_uri")},
        "status": "ok" if error is None else "error",
        "error": error,
        "error_kind": decoded.error_kind,
        "encoder": encoder,
        "run_id": run_id,
        "num_clips": 0 if error else len(decoded.clips),
    }
    if error is None:
        row.update({k: decoded.end.get(k) for k in ("duration_s", "width", "height", "fps")})
    return row


def relinked_rows(
    manifest: dict[str, dict[str, Any]], extracted: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """New manifest rows for extracted videos whose transcript sidecar was added, removed or
    renamed. The features stand; only the row changes, and tokenize then re-reads the narration."""
    rows = []
    for video in extracted:
        row = manifest[video["video_id"]]
        if row["transcript_uri"] != video["transcript_uri"]:
            kept = {k: v for k, v in row.items() if k not in ("updated_at", "transcript_error")}
            rows.append({**kept, "transcript_uri": video["transcript_uri"]})
    return rows


def gather_videos(
    batches: Iterable[dict[str, np.ndarray]], stage: str, expected: Iterable[str] = (), tries: int = 1
) -> Iterator[DecodedVideo]:
    """Every video of a stream of row batches, as soon as all its rows arrived. At the end, as
    errors: any video whose rows never all arrived, and any `expected` video that sent none
    (its decode task died `tries` times: killed for memory, or its node lost)."""
    gatherer = ClipGatherer()
    seen: set[str] = set()
    for batch in batches:
        seen.update(str(v) for v in batch["video_id"])
        yield from gatherer.add_batch(batch)
    yield from gatherer.leftovers(stage)
    for vid in sorted(set(expected) - seen):
        reason = f"{stage}: decoder killed (out of memory or a lost node) after {tries} tries"
        yield DecodedVideo(vid, {"status": "error", "error": reason, "error_kind": tables.TRANSIENT}, {})


def decoded_videos_here(
    videos: list[dict[str, Any]],
    decode: DecodeConfig,
    s3: S3Config,
    stage: Callable[..., Any],
    batch_size: int,
) -> Iterator[DecodedVideo]:
    """`videos` through `decode_video` and `stage` (a ClipFeatures or ClipWords instance) in this
    process, one video at a time and `batch_size` rows per call: the chain of
    pipelines.ray_stages.decoded_videos without Ray. Only a batch of frames is held at once."""

    def batches() -> Iterator[dict[str, np.ndarray]]:
        for video in videos:
            rows: list[dict[str, Any]] = []
            for row in decode_video(video, decode, s3):
                rows.append(row)
                if len(rows) == batch_size or row["kind"] == END:
                    # Object columns, as Ray hands them over: raw frame bytes keep every byte.
                    yield stage({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]})
                    rows = []

    yield from gather_videos(batches(), "decode", [v["video_id"] for v in videos])


@dataclass
class ExtractPlan:
    """What an extract run has to do."""

    videos: list[dict[str, Any]]
    """Every listed video."""
    todo: list[dict[str, Any]]
    """Videos to decode: new, changed, extracted with another encoder, or failed (retried)."""
    relinked: list[dict[str, Any]]
    """Manifest rows to rewrite: extracted videos whose transcript sidecar changed."""
    manifest: dict[str, dict[str, Any]]
    """video_id -> its current manifest row."""


def plan_extract(config: ExperimentConfig, encoder: str) -> ExtractPlan:
    """List `source` and compare it with the manifest (the skip rule of `is_up_to_date`)."""
    videos = list_videos(config)
    manifest = rows_by_video(tables.read_manifest(config.output, config.s3))
    todo = videos_to_do(videos, manifest, config.extract.retry_errors, encoder=encoder)
    todo_ids = {v["video_id"] for v in todo}
    extracted = [
        v for v in videos if v["video_id"] not in todo_ids and manifest[v["video_id"]]["status"] == "ok"
    ]
    return ExtractPlan(videos, todo, relinked_rows(manifest, extracted), manifest)


class ExtractCommitter(ManifestCommitter):
    """Commits each decoded video of an extract run: its features file, then its manifest row."""

    def __init__(
        self,
        config: ExperimentConfig,
        videos: list[dict[str, Any]],
        summary: VideoStageSummary,
        encoder: str,
        current: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(
            lambda rows: tables.upsert_manifest(config.output, rows, config.s3),
            config.extract.manifest_flush_every,
            summary,
            config.s3,
            current,
        )
        self.videos = {v["video_id"]: v for v in videos}
        self.layout = tables.Layout(config.output)
        self.encoder = encoder

    def commit_video(self, decoded: DecodedVideo) -> None:
        video = self.videos[decoded.video_id]
        row = extract_manifest_row(video, decoded, self.encoder, self.summary.run_id)
        output = features_table(decoded) if row["error"] is None else None
        features_file = self.layout.features_file(decoded.video_id)
        self.commit(video, row, features_file, output, row["error"], row["num_clips"])
