"""tokenize throughput on a local Ray instance vs the same work in one plain process.

Writes `--videos` videos of `--clips` synthetic clip features (every other one with a VTT
sidecar) through the table contracts (tests/feature_corpus.py), fits a small codebook, and
runs `tokenize` once untimed (starts Ray, trains the text tokenizer). Then, alternating for
`--rounds`:

- ours: `pipelines.tokenize.run` over every video again (token files and tokens manifest
  removed first), i.e. the Ray Data actor pool, actor start-up included;
- peer: a plain loop in this process doing the same per-video work: read features, assign
  visual words, parse the transcript, align, encode text, write one file per video
  (`TokenShardWriter` called directly, codebook load included), into a scratch directory.

Both must produce the same token rows. Reports segments/s and clips/s (best round) and the
throughput ratio ours/peer.

    python benchmarks/bench_tokenize.py --videos 64 --clips 200
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipelines import fit_codebook, tokenize  # noqa: E402
from pipelines.ray_stages import VIDEOS_PER_TOKEN_BATCH  # noqa: E402
from tests.feature_corpus import vtt_cues, write_video  # noqa: E402
from videobert import storage  # noqa: E402
from videobert.config import ExperimentConfig, load_config  # noqa: E402
from videobert.results import TokenizeResult  # noqa: E402
from videobert.tables import Layout, read_manifest  # noqa: E402
from videobert.token_shards import TokenShardWriter, read_tokens  # noqa: E402


def write_corpus(config: ExperimentConfig, videos: int, clips: int) -> None:
    """`videos` committed videos of `clips` clips; every other one has a VTT sidecar."""
    transcript = vtt_cues(1.5 * clips)
    for number in range(videos):
        kind = "vtt" if number % 2 == 0 else None
        write_video(config.output, config.source, number, clips, kind, transcript_data=transcript)


def run_ours(config: ExperimentConfig, codebook_version: str, tokenizer_version: str) -> TokenizeResult:
    """`tokenize.run` over every video: its outputs for this version are removed first."""
    layout = Layout(config.output)
    storage.delete(layout.tokens(codebook_version, tokenizer_version))
    storage.delete(layout.tokens_manifest(codebook_version, tokenizer_version))
    return tokenize.run(config)


def run_peer(config: ExperimentConfig, summary: TokenizeResult, scratch: str) -> int:
    """The same per-video work in one plain loop, same batch size; returns segments written."""
    storage.delete(scratch)
    manifest = read_manifest(config.output)
    ids, transcripts = manifest["video_id"].to_pylist(), manifest["transcript_uri"].to_pylist()
    body = TokenShardWriter(
        config.output,
        summary.codebook.uri,
        summary.tokenizer.uri,
        config.tokenize.segment_tokens,
        config.tokenize.sentence_gap_s,
    )
    body.directory = scratch  # write beside, not over, the stage's output
    segments = 0
    step = VIDEOS_PER_TOKEN_BATCH
    for begin in range(0, len(ids), step):
        batch = {
            "video_id": ids[begin : begin + step],
            "transcript_uri": [t or "" for t in transcripts[begin : begin + step]],
        }
        segments += sum(body(batch)["segments"])
    return segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="alternating timed rounds; best is reported")
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
        write_corpus(config, args.videos, args.clips)
        fit_codebook.run(config)
        started = time.perf_counter()
        first = tokenize.run(config)  # Ray start-up and tokenizer training: not timed below
        first_s = time.perf_counter() - started
        versions = (first.codebook.version, first.tokenizer.version)
        scratch = storage.join(root, "peer-tokens")

        ours_s, peer_s = float("inf"), float("inf")
        for _ in range(args.rounds):
            started = time.perf_counter()
            summary = run_ours(config, *versions)
            ours_s = min(ours_s, time.perf_counter() - started)
            started = time.perf_counter()
            peer_segments = run_peer(config, first, scratch)
            peer_s = min(peer_s, time.perf_counter() - started)
        assert summary.videos_tokenized == args.videos and summary.segments == peer_segments
        ours_rows = read_tokens(config.output, *versions)
        peer_rows = storage.read_parquet_dir(scratch).select(ours_rows.column_names).cast(ours_rows.schema)
        peer_rows = peer_rows.sort_by([("video_id", "ascending"), ("segment_index", "ascending")])
        assert ours_rows.equals(peer_rows), "ours and the peer wrote different token rows"

        clips, segments = args.videos * args.clips, summary.segments
        print(f"{args.videos} videos x {args.clips} clips = {clips} clips -> {segments} segments (rows)")
        print(f"first tokenize run (Ray start-up + tokenizer training included): {first_s:.2f} s")
        for name, seconds in (("ours (Ray Data)", ours_s), ("peer (one process)", peer_s)):
            print(
                f"{name:19}: {seconds:7.2f} s  {segments / seconds:9.0f} rows/s  {clips / seconds:9.0f} clips/s"
            )
        print(f"ours/peer throughput: x{peer_s / ours_s:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
