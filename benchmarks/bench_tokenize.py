"""tokenize throughput on a local Ray cluster: synthetic committed features -> token shards.

Writes `--videos` videos of `--clips` random 1024-d clip features (half with a VTT sidecar)
through the table contracts, fits a small codebook (fit-codebook), then times `tokenize`
and reports segments/s and clips/s. The peer is the same per-video work in one process
without Ray (`VideoTokenizer` called directly), so the ratio shows Ray Data's overhead/gain.

    python benchmarks/bench_tokenize.py --videos 64 --clips 200
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa

from pipelines import fit_codebook, tokenize
from videobert import storage
from videobert.config import load_config
from videobert.tables import FEATURE_DIM, FEATURES_SCHEMA, Layout, append_manifest, video_id
from videobert.token_shards import VideoTokenizer


def write_corpus(output: str, source: str, videos: int, clips: int) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for number in range(videos):
        uri = storage.join(source, f"video{number}.mp4")
        vid = video_id(uri)
        features = rng.normal(size=(clips, FEATURE_DIM)).astype(np.float32)
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        table = pa.table(
            {
                "video_id": [vid] * clips,
                "clip_index": list(range(clips)),
                "start_s": [1.5 * i for i in range(clips)],
                "end_s": [1.5 * (i + 1) for i in range(clips)],
                "feature": pa.array(list(features.astype(np.float16)), FEATURES_SCHEMA.field("feature").type),
            },
            schema=FEATURES_SCHEMA,
        )
        storage.write_parquet(table, Layout(output).features_file(vid))
        transcript = None
        if number % 2 == 0:
            transcript = storage.join(source, f"video{number}.vtt")
            cues = "".join(
                f"\n{i * 6 // 60:02d}:{i * 6 % 60:02d}.000 --> {(i * 6 + 4) // 60:02d}:{(i * 6 + 4) % 60:02d}.000\n"
                f"Step {i}: stir the pot and add some salt. Then wait.\n"
                for i in range(clips * 3 // 12)
                if (i * 6 + 4) < 3600
            )
            storage.write_bytes(transcript, ("WEBVTT\n" + cues).encode())
        rows.append(
            {
                "video_id": vid,
                "source_uri": uri,
                "status": "ok",
                "num_clips": clips,
                "transcript_uri": transcript,
            }
        )
    append_manifest(output, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--clips", type=int, default=200)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="bench-tokenize-")
    try:
        config = load_config(
            None,
            [
                f"output={root}/out",
                f"source={root}/videos",
                "codebook.k=12",
                "codebook.depth=2",
                "codebook.sample_size=20000",
                "codebook.iterations=10",
                "codebook.gallery_words=0",
                "text.vocab_size=500",
                f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db",
            ],
        )
        write_corpus(config.output, config.source, args.videos, args.clips)
        fit_codebook.run(config)
        started = time.perf_counter()
        summary = tokenize.run(config)  # includes training the tokenizer once
        ray_s = time.perf_counter() - started
        clips = args.videos * args.clips

        # Peer: the same work in this process, no Ray, into a scratch output.
        body = VideoTokenizer(
            config.output, summary_codebook(config), summary["tokenizer_uri"], config.tokenize.segment_tokens
        )
        body.directory = storage.join(root, "peer-tokens")
        from videobert.tables import read_manifest

        manifest = read_manifest(config.output)
        batch = {
            "video_id": manifest["video_id"].to_pylist(),
            "transcript_uri": manifest["transcript_uri"].to_pylist(),
        }
        started = time.perf_counter()
        for begin in range(0, len(batch["video_id"]), tokenize.VIDEOS_PER_BATCH):
            body({name: column[begin : begin + tokenize.VIDEOS_PER_BATCH] for name, column in batch.items()})
        local_s = time.perf_counter() - started

        print(f"{args.videos} videos x {args.clips} clips = {clips} clips, {summary['segments']} segments")
        print(
            f"ray tokenize : {ray_s:7.2f} s  {summary['segments'] / ray_s:9.0f} segments/s  {clips / ray_s:9.0f} clips/s"
        )
        print(
            f"in-process   : {local_s:7.2f} s  {summary['segments'] / local_s:9.0f} segments/s  {clips / local_s:9.0f} clips/s"
        )
        print(f"ours(ray)/in-process throughput ratio: x{local_s / ray_s:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def summary_codebook(config) -> str:
    from videobert.codebook import latest_codebook

    return latest_codebook(config.output, k=config.codebook.k, depth=config.codebook.depth)


if __name__ == "__main__":
    main()
