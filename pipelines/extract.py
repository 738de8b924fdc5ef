"""`videobert extract`: videos under `source` -> clip features (features/) + the manifest (videos/).

Ray Data plan:

    from_items(videos)                       one block per video
      .flat_map(decode_video)                decode tasks (CPU): a row per clip, then one
                                             "end" row per video with its status and info
      .map_batches(FeatureActor)             actor pool (a GPU each when the cluster has
                                             GPUs), S3D loaded once per actor
      .iter_batches()  -> the driver         commits each video when its end row and all its
                                             clip rows have arrived

A bad file becomes an end row with status `error`, never an exception that stops the run.
Commit order per video: features/<video_id>.parquet first (atomic, deterministic name), its
manifest row later (buffered, appended every `extract.manifest_flush_every` videos). Readers
go through the manifest, so a kill at any point leaves only committed work visible, and a
rerun redoes exactly the videos without an `ok` row.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.common import init_ray, stage_main
from videobert import storage, tables
from videobert.config import DecodeConfig, EncoderConfig, ExperimentConfig, S3Config
from videobert.decode import DecodeError, iter_clips

log = logging.getLogger("videobert.extract")

CLIP, END = "clip", "end"


@dataclass
class ExtractSummary:
    """What one extract run did."""

    listed: int = 0
    ok: int = 0
    error: int = 0
    skipped: int = 0
    relinked: int = 0
    """Extracted videos whose transcript sidecar appeared, vanished or changed name."""
    clips: int = 0
    seconds: float = 0.0
    features: str = ""
    manifest: str = ""
    run_id: str = ""
    errors: dict[str, str] = field(default_factory=dict)
    """source_uri -> "<stage>: <reason>" for every video that ended in error."""

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0

    def report(self) -> str:
        lines = [
            f"extract {self.run_id}: {self.listed} videos listed: {self.ok} ok, {self.error} error, "
            f"{self.skipped} skipped (already extracted)"
            + (f", {self.relinked} with a new transcript sidecar" if self.relinked else ""),
            f"  {self.clips} clips in {self.seconds:.1f} s ({self.clips_per_s:.1f} clips/s)",
            f"  features: {self.features}",
            f"  manifest: {self.manifest}",
        ]
        lines += [f"  error: {uri}: {reason}" for uri, reason in sorted(self.errors.items())]
        return "\n".join(lines)


# ---- listing -----------------------------------------------------------------------------


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


def manifest_by_video(output: str, s3: S3Config) -> dict[str, dict[str, Any]]:
    """video_id -> its committed manifest row."""
    return {row["video_id"]: row for row in tables.read_manifest(output, s3).to_pylist()}


def is_extracted(row: dict[str, Any] | None, video: dict[str, Any], encoder: str) -> bool:
    """The manifest holds this very object (same ETag) extracted ok with this encoder."""
    return row is not None and (row["status"], row["etag"], row["encoder"]) == ("ok", video["etag"], encoder)


def relinked_rows(done: dict[str, dict[str, Any]], extracted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """New manifest rows for extracted videos whose transcript sidecar was added, removed or
    renamed. The features stand; only the row changes, and tokenize then re-reads the narration."""
    rows = []
    for video in extracted:
        row = done[video["video_id"]]
        if row["transcript_uri"] != video["transcript_uri"]:
            kept = {k: v for k, v in row.items() if k not in ("updated_at", "transcript_error")}
            rows.append({**kept, "transcript_uri": video["transcript_uri"]})
    return rows


# ---- Ray Data stages ---------------------------------------------------------------------


def decode_video(video: dict[str, Any], decode: DecodeConfig, s3: S3Config) -> Iterator[dict[str, Any]]:
    """One video -> a row per clip (frames as raw bytes), then one END row with status and info.

    Every failure ends as an END row with status error: the run goes on.
    """
    base = {"video_id": video["video_id"], "start_s": 0.0, "end_s": 0.0}
    emitted = 0
    info: dict[str, Any] = {"status": "ok", "error": None}
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
    except DecodeError as error:
        info.update(status="error", error=f"decode: {error.reason}")
    except storage.StorageError as error:
        info.update(status="error", error=f"read: {error}")
    except Exception as error:  # anything unforeseen is still a row, with enough to debug it
        info.update(status="error", error=f"decode: unexpected {type(error).__name__}: {error}")
        log.warning("unexpected error decoding %s:\n%s", video["source_uri"], traceback.format_exc())
    if info["status"] == "ok" and emitted == 0:
        info.update(
            status="error",
            error=f"decode: shorter than one clip ({decode.clip_seconds:.2f} s at {decode.fps:g} fps)",
        )
    info["emitted"] = emitted
    yield {**base, "kind": END, "clip_index": -1, "frames": b"", "info": json.dumps(info)}


class FeatureActor:
    """Holds one S3D encoder (built once) and turns batches of clip rows into features."""

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


def feature_pool(config: ExperimentConfig) -> tuple[int, float, float]:
    """(actors, GPUs per actor, CPUs per actor) for this cluster."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if config.extract.feature_actors is not None:
        actors = config.extract.feature_actors
    elif gpus:
        actors = gpus
    else:
        # Leave about half of the CPUs to the decode tasks that feed the actors.
        actors = max(1, cpus // 2)
    return actors, (1.0 if gpus else 0.0), config.extract.cpus_per_feature_actor


# ---- committing --------------------------------------------------------------------------


class ClipGatherer:
    """Regroups rows by video: a video is complete once its END row and all its clip rows arrived.

    They arrive in any order (a video's clips are spread over the feature actors).
    """

    def __init__(self) -> None:
        self.clips: dict[str, dict[int, dict[str, Any]]] = {}
        self.ends: dict[str, dict[str, Any]] = {}

    def add(self, row: dict[str, Any]) -> tuple[str, dict[str, Any], dict[int, dict[str, Any]]] | None:
        """Take one row; returns (video_id, END info, clip rows by clip_index) when that video is complete."""
        vid = row["video_id"]
        if row["kind"] == END:
            self.ends[vid] = json.loads(row["info"])
        else:
            self.clips.setdefault(vid, {})[int(row["clip_index"])] = row
        end = self.ends.get(vid)
        if end is not None and len(self.clips.get(vid, {})) == end["emitted"]:
            del self.ends[vid]
            return vid, end, self.clips.pop(vid, {})
        return None

    def leftovers(self, stage: str) -> list[tuple[str, dict[str, Any]]]:
        """Videos whose rows never all arrived (should not happen), each with an error END info."""
        left = []
        for vid in sorted(set(self.ends) | set(self.clips)):
            got = len(self.clips.get(vid, {}))
            want = self.ends.get(vid, {}).get("emitted", "?")
            left.append(
                (vid, {"status": "error", "error": f"{stage}: incomplete results ({got} of {want} clips)"})
            )
        self.clips, self.ends = {}, {}
        return left


class Committer:
    """Collects rows per video; writes a video's features, then (buffered) its manifest row."""

    def __init__(
        self, config: ExperimentConfig, videos: list[dict[str, Any]], encoder: str, run_id: str
    ) -> None:
        self.config = config
        self.layout = tables.Layout(config.output)
        self.videos = {v["video_id"]: v for v in videos}
        self.encoder = encoder
        self.run_id = run_id
        self.gatherer = ClipGatherer()
        self.pending_rows: list[dict[str, Any]] = []
        self.summary = ExtractSummary()

    def add(self, row: dict[str, Any]) -> None:
        complete = self.gatherer.add(row)
        if complete is not None:
            self.commit(*complete)

    def commit(self, vid: str, end: dict[str, Any], clips: dict[int, dict[str, Any]]) -> None:
        video = self.videos[vid]
        status, error = end["status"], end["error"]
        feature_errors = sorted({c["error"] for c in clips.values() if c["error"]})
        if status == "ok" and feature_errors:
            status, error = "error", feature_errors[0]
        row = {
            **{k: video[k] for k in ("video_id", "source_uri", "etag", "size", "transcript_uri")},
            "status": status,
            "error": error,
            "encoder": self.encoder,
            "run_id": self.run_id,
            "num_clips": 0,
        }
        if status == "ok":
            order = sorted(clips)
            table = pa.table(
                {
                    "video_id": [vid] * len(order),
                    "clip_index": order,
                    "start_s": [float(clips[i]["start_s"]) for i in order],
                    "end_s": [float(clips[i]["end_s"]) for i in order],
                    "feature": [clips[i]["feature"].astype(np.float16) for i in order],
                },
                schema=tables.FEATURES_SCHEMA,
            )
            storage.write_parquet(table, self.layout.features_file(vid), self.config.s3)
            row.update(
                num_clips=len(order),
                duration_s=end.get("duration_s"),
                width=end.get("width"),
                height=end.get("height"),
                fps=end.get("fps"),
            )
            self.summary.ok += 1
            self.summary.clips += len(order)
        else:
            # A video that was ok before and is bad now must not keep stale features around.
            storage.delete(self.layout.features_file(vid), self.config.s3)
            self.summary.error += 1
            self.summary.errors[video["source_uri"]] = error
            log.warning("%s: %s", video["source_uri"], error)
        self.pending_rows.append(row)
        if len(self.pending_rows) >= self.config.extract.manifest_flush_every:
            self.flush()

    def flush(self) -> None:
        tables.append_manifest(self.config.output, self.pending_rows, self.config.s3)
        self.pending_rows = []

    def finish(self) -> None:
        """Record videos whose rows never all arrived (should not happen), then flush."""
        for vid, end in self.gatherer.leftovers("extract"):
            self.commit(vid, end, {})
        self.flush()


# ---- the stage ---------------------------------------------------------------------------


def run(config: ExperimentConfig) -> ExtractSummary:
    """Extract features for every new or changed video under `source` (see module doc)."""
    # torch is imported here, not at module level, so `--help` and config errors answer at once.
    from videobert.features import encoder_id, load_weights

    started = time.perf_counter()
    run_id = f"extract-{tables.now_utc().strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    storage.check_reachable(config.source, config.s3)
    storage.check_reachable(config.output, config.s3, create=True)
    encoder = encoder_id(config.encoder)
    load_weights(config.encoder, config.s3)  # fail fast (exit 2) when the weights cannot be had

    videos = list_videos(config)
    done = manifest_by_video(config.output, config.s3)
    todo = [v for v in videos if not is_extracted(done.get(v["video_id"]), v, encoder)]
    relinked = relinked_rows(done, [v for v in videos if is_extracted(done.get(v["video_id"]), v, encoder)])
    tables.append_manifest(config.output, relinked, config.s3)
    layout = tables.Layout(config.output)
    committer = Committer(config, todo, encoder, run_id)
    summary = committer.summary
    summary.run_id, summary.listed, summary.skipped = run_id, len(videos), len(videos) - len(todo)
    summary.relinked = len(relinked)
    summary.features, summary.manifest = layout.features, layout.videos

    if todo:
        import ray

        init_ray()
        actors, gpus, cpus = feature_pool(config)
        log.info(
            "extracting %d videos (%d skipped) with %d feature actors", len(todo), summary.skipped, actors
        )
        dataset = (
            ray.data.from_items(todo, override_num_blocks=len(todo))
            .flat_map(
                decode_video,
                fn_kwargs={"decode": config.decode, "s3": config.s3},
                num_cpus=1,
                concurrency=config.extract.decode_concurrency,
            )
            .map_batches(
                FeatureActor,
                fn_constructor_kwargs={"encoder": config.encoder, "decode": config.decode, "s3": config.s3},
                batch_size=config.encoder.clips_per_batch,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_gpus=gpus,
                num_cpus=cpus,
            )
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["video_id"])):
                committer.add({name: column[i] for name, column in batch.items()})
    committer.finish()
    tables.compact_manifest(config.output, config.s3)
    summary.seconds = time.perf_counter() - started
    print(summary.report(), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("extract", run, argv)


if __name__ == "__main__":
    sys.exit(main())
