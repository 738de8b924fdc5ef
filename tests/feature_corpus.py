"""A synthetic committed-features corpus, written through the table contracts only.

Each video is a features file of planted prototypes (L2-normalised, like the encoder's
output), an optional transcript sidecar under `source`, and an `ok` manifest row: what
extract would have committed, without decoding anything. Used by the fit-codebook/tokenize
tests and by benchmarks/bench_tokenize.py.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from videobert import storage
from videobert.tables import FEATURE_DIM, FEATURES_SCHEMA, Layout, upsert_manifest, video_id

PROTOTYPES = np.random.default_rng(123).normal(size=(4, FEATURE_DIM))

TRANSCRIPTS = {
    "vtt": b"WEBVTT\n\n00:00:00.000 --> 00:00:03.000\nCrack the eggs into the bowl.\n\n"
    b"00:00:09.000 --> 00:00:12.000\nWhisk them well. Then heat the pan.\n",
    "srt": b"1\n00:00:01,500 --> 00:00:04,500\nChop the onions finely.\n",
    "json": json.dumps([{"start": 0, "end": 6, "text": "Stir the sauce slowly."}]).encode(),
    "bad.vtt": b"this is not a caption file",
}


def vtt_cues(duration_s: float, every_s: float = 6.0, length_s: float = 4.0) -> bytes:
    """A WebVTT transcript with one two-sentence cue every `every_s` seconds."""

    def stamp(seconds: float) -> str:
        minutes, rest = divmod(seconds, 60.0)
        hours, minutes = divmod(int(minutes), 60)
        return f"{hours:02d}:{minutes:02d}:{rest:06.3f}"

    starts = np.arange(0.0, max(duration_s - length_s, 0.0), every_s)
    cues = "".join(
        f"\n{stamp(s)} --> {stamp(s + length_s)}\nStep {i}: stir the pot and add some salt. Then wait.\n"
        for i, s in enumerate(starts)
    )
    return ("WEBVTT\n" + cues).encode()


def write_video(
    output: str,
    source_dir: str,
    number: int,
    clips: int = 10,
    transcript: str | None = None,
    seed: int | None = None,
    etag: str = "e",
    transcript_data: bytes | None = None,
) -> str:
    """One committed video (features, sidecar, manifest row); returns its video_id.

    `transcript` is a kind in TRANSCRIPTS, or with `transcript_data` the extension of that
    custom sidecar. Called again with another `seed` and `etag`, it stands for a re-extract
    of a changed source video.
    """
    source_uri = storage.join(source_dir, f"video{number}.mp4")
    vid = video_id(source_uri)
    rng = np.random.default_rng(number if seed is None else seed)
    kinds = rng.integers(0, len(PROTOTYPES), size=clips)
    features = PROTOTYPES[kinds] + 0.05 * rng.normal(size=(clips, FEATURE_DIM))
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
    transcript_uri = None
    if transcript:
        transcript_uri = storage.join(source_dir, f"video{number}.{transcript.split('.')[-1]}")
        storage.write_bytes(
            transcript_uri, TRANSCRIPTS[transcript] if transcript_data is None else transcript_data
        )
    row = {
        "video_id": vid,
        "source_uri": source_uri,
        "etag": etag,
        "size": 1,
        "status": "ok",
        "num_clips": clips,
        "duration_s": 1.5 * clips,
        "transcript_uri": transcript_uri,
        "encoder": "synthetic",
    }
    upsert_manifest(output, [row])
    return vid
