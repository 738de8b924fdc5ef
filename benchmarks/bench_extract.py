"""The Ray extract pipeline's clips per CPU-second vs a plain single-process loop doing the same work.

    python benchmarks/bench_extract.py [--videos 48] [--seconds 20] [--size 112]

Both sides decode the same generated videos (160x120 h264 at 24 fps, resampled to 8 fps,
8-frame clips, `--size` px) and run the same random-weight S3D (`encoder.weights=none`) in
batches of 8, writing features/<video_id>.parquet per video.
Ours: `pipelines.extract.run` on a local Ray instance (started before timing) with this
machine's CPUs, sized by pipelines/ray_stages.py: decode tasks and the feature actor run
concurrently, the actor's torch threads following its CPU allotment.
Peer: one Python process, video after video: `iter_clips` -> batches -> `ClipEncoder` -> write
(torch uses every core for the forward; decoding runs on one).
Rounds alternate (peer, then ours on a fresh Ray instance) and the best of each side counts.
Both sides have the machine's CPUs, so clips per CPU-second = clips / (seconds x CPUs).
Prints both and the ratio ours/peer (goal >= 0.9 at >= 900 clips, on an idle machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import videos  # noqa: E402
from videobert import storage, tables  # noqa: E402
from videobert.config import ExperimentConfig, load_config  # noqa: E402
from videobert.decode import iter_clips  # noqa: E402


def plain_loop(config: ExperimentConfig) -> int:
    """The peer: decode and encode every video in this one process."""
    from videobert.features import ClipEncoder

    encoder = ClipEncoder(config.encoder, device="cpu")
    layout = tables.Layout(config.output)
    total = 0
    for obj in storage.list_objects(config.source, extensions=config.decode.extensions):
        rows: list[tuple[int, float, float, np.ndarray]] = []
        batch: list = []

        def flush(batch: list = batch, rows: list = rows) -> None:  # bound now: one video's lists
            features = encoder(np.stack([clip.frames for clip in batch]))
            rows.extend((c.clip_index, c.start_s, c.end_s, f) for c, f in zip(batch, features, strict=True))
            batch.clear()

        for clip in iter_clips(obj.uri, config.decode):
            batch.append(clip)
            if len(batch) == config.encoder.clips_per_batch:
                flush()
        if batch:
            flush()
        vid = tables.video_id(obj.uri)
        table = pa.table(
            {
                "video_id": [vid] * len(rows),
                "clip_index": [r[0] for r in rows],
                "start_s": [r[1] for r in rows],
                "end_s": [r[2] for r in rows],
                "feature": [r[3].astype(np.float16) for r in rows],
            },
            schema=tables.FEATURES_SCHEMA,
        )
        storage.write_parquet(table, layout.features_file(vid))
        total += len(rows)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--rounds", type=int, default=2, help="alternating timed rounds; best of each")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="config override for ours"
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        for i in range(args.videos):
            videos.make_object_video(
                tmp / "videos" / f"v{i:03d}.mp4",
                seed=i,
                num_frames=24 * args.seconds,
                fps=24,
                height=120,
                width=160,
            )
        overrides = [
            f"source={tmp / 'videos'}",
            "decode.fps=8",
            "decode.clip_frames=8",
            f"decode.size={args.size}",
            "encoder.weights=none",
            "encoder.clips_per_batch=8",
        ]
        import ray

        from pipelines import extract

        peer_s, ours_s = float("inf"), float("inf")
        for round_number in range(args.rounds):
            # Alternating rounds, fresh outputs each time, the best of each side counts: drifting
            # load from other processes then favours neither.
            peer_config = load_config(None, [*overrides, f"output={tmp / f'peer{round_number}'}"])
            ours_config = load_config(
                None, [*overrides, f"output={tmp / f'ours{round_number}'}", *args.overrides]
            )
            started = time.perf_counter()
            peer_clips = plain_loop(peer_config)
            peer_s = min(peer_s, time.perf_counter() - started)
            # address="local": a private instance, never a cluster another process started here.
            # Started before timing; the actors' start-up (torch import, S3D build) is timed.
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            started = time.perf_counter()
            summary = extract.run(ours_config)
            ours_s = min(ours_s, time.perf_counter() - started)
            ray.shutdown()
            assert summary.clips == peer_clips, (summary.clips, peer_clips)

        print(
            f"{args.videos} videos x {args.seconds} s, {peer_clips} clips of 8 x {args.size} px, {os.cpu_count()} CPUs"
        )
        cpus = os.cpu_count() or 1
        for name, seconds in (("plain single-process loop", peer_s), ("Ray Data extract pipeline", ours_s)):
            rate = peer_clips / seconds
            print(f"  {name}: {rate:7.2f} clips/s, {rate / cpus:6.2f} clips per CPU-second ({seconds:.1f} s)")
        print(f"  ratio ours/peer: {peer_s / ours_s:.2f} (goal >= 0.9); load average {os.getloadavg()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
