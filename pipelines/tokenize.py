"""`videobert tokenize`: visual words + narration sentences -> token shards in `tokens/`.

1. Codebook: the one `fit-codebook` made (under `run`), else the newest with this config's k
   and depth (`videobert.results.find_codebook`).
2. Text tokenizer: `videobert.token_shards.ensure_tokenizer` (the `text` section's rule; the
   corpus sentences it may train on are parsed by Ray tasks).
3. TokenShardWriter actors (codebook loaded once, GPU when there is one) write
   `tokens/<codebook>-<tokenizer>/<video_id>.parquet` for the `ok` videos whose token file is
   missing or was made from other inputs (`plan_tokenize`); `record_tokenized` then commits
   the tokens manifest and the transcript and feature errors. A rerun over unchanged inputs
   writes nothing; a new codebook or tokenizer version is a new directory.
"""

from __future__ import annotations

import logging
import sys

from pipelines.common import init_ray, stage_main
from pipelines.ray_stages import map_tasks, tokenized_videos
from videobert.config import ExperimentConfig
from videobert.results import CodebookResult, TokenizeResult, require_codebook, token_files
from videobert.tables import read_manifest
from videobert.token_shards import (
    ensure_tokenizer,
    plan_tokenize,
    record_tokenized,
    sentences_of_transcripts,
)

log = logging.getLogger("videobert.tokenize")

TRANSCRIPTS_PER_TASK = 16


def corpus_sentences(config: ExperimentConfig) -> list[str]:
    """Sentences of every usable transcript of the `ok` videos, parsed by Ray tasks."""
    import ray.data

    manifest = read_manifest(config.output, config.s3)
    uris = sorted(
        {
            u
            for u, s in zip(
                manifest["transcript_uri"].to_pylist(), manifest["status"].to_pylist(), strict=True
            )
            if u and s == "ok"
        }
    )
    if not uris:
        return []
    s3, gap, limit = config.s3, config.tokenize.sentence_gap_s, config.tokenize.max_transcript_bytes

    def parse(batch: dict[str, list[str]]) -> dict[str, list[str]]:
        return {"text": sentences_of_transcripts([str(u) for u in batch["transcript_uri"]], s3, gap, limit)}

    dataset = map_tasks(
        ray.data.from_items([{"transcript_uri": u} for u in uris]), parse, TRANSCRIPTS_PER_TASK
    )
    return [row["text"] for row in dataset.take_all()]


def run(config: ExperimentConfig, codebook: CodebookResult | None = None) -> TokenizeResult:
    """Tokenize every `ok` video whose token file is missing or stale (see the module doc)."""
    codebook = codebook or require_codebook(config)
    init_ray()
    tokenizer = ensure_tokenizer(config, lambda: corpus_sentences(config))
    plan = plan_tokenize(config, codebook, tokenizer)
    result = plan.result
    if plan.videos.num_rows == 0:
        log.info("tokens in %s are up to date (%d videos)", result.tokens_uri, result.videos_done_before)
    else:
        log.info(
            "tokenizing %d videos (%d changed since their tokens were made; %d up to date)",
            plan.videos.num_rows,
            result.videos_changed,
            result.videos_done_before,
        )
        statuses = tokenized_videos(config, plan.items(), codebook.uri, tokenizer.uri)
        record_tokenized(config, plan, statuses)
        log.info(
            "tokenized %d videos into %d segments in %s",
            result.videos_tokenized,
            result.segments,
            result.tokens_uri,
        )
    result.files = token_files(result.tokens_uri, config)
    return result


def main(argv: list[str] | None = None) -> int:
    return stage_main("tokenize", run, argv)


if __name__ == "__main__":
    sys.exit(main())
