"""`videobert tokenize`: visual words + narration sentences -> token shards in `tokens/`.

1. Codebook: the newest one with this config's k and depth (run fit-codebook first).
2. Text tokenizer, one rule: `text.vocab` set -> built from that vocab file; otherwise the
   newest tokenizer trained with this vocab_size and lower-casing is reused, and one is
   trained on the sentences of every `ok` video's transcript only when none exists (or
   `text.retrain` is set). A new corpus alone does not retrain it, so token versions stay
   stable while videos are added.
3. Ray Data over the `ok` videos whose token file under `tokens/<codebook>-<tokenizer>/` is
   missing or was made from other inputs: the tokens manifest
   (`tokens_manifest/<codebook>-<tokenizer>/`) records, per video, the source ETag, encoder
   and extract run of the features and the transcript's ETag it was made from. A pool of
   `TokenShardWriter` actors (codebook loaded once, GPU when there is one) writes
   `<video_id>.parquet` per video (the same name, so a changed video's rows are replaced,
   never duplicated); the tokens-manifest rows are appended after the files. A rerun over
   unchanged inputs writes nothing; a new codebook or tokenizer version is a new directory.
4. Manifest: a transcript that cannot be used gets the video's row re-appended with
   `transcript_error` (the video still gives video-only segments); a video whose features
   cannot be read gets an `error` row, and its token file, made from older features, is
   removed (so is that of any video the manifest now marks `error`). Nothing disappears
   silently.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.common import init_ray, stage_main
from videobert import storage
from videobert.codebook import HierarchicalCodebook, latest_codebook
from videobert.config import ExperimentConfig
from videobert.tables import (
    Layout,
    append_manifest,
    append_tokens_manifest,
    compact_tokens_manifest,
    read_manifest,
    read_tokens_manifest,
)
from videobert.text_tokenizer import TextTokenizer, latest_tokenizer
from videobert.token_shards import (
    TokenShardWriter,
    inputs_key,
    load_sentences,
    token_inputs,
    transcript_etags,
)
from videobert.transcripts import TranscriptError

log = logging.getLogger("videobert.tokenize")

VIDEOS_PER_BATCH = 8


def _ok_videos(manifest: pa.Table) -> pa.Table:
    return manifest.filter(pc.equal(manifest.column("status"), "ok"))


def corpus_sentences(config: ExperimentConfig, videos: pa.Table) -> list[str]:
    """Sentences of every usable transcript, parsed in parallel with Ray Data."""
    import ray

    uris = [u for u in videos.column("transcript_uri").to_pylist() if u]
    if not uris:
        return []
    s3, gap = config.s3, config.tokenize.sentence_gap_s

    def parse(batch: dict[str, Any]) -> dict[str, list[str]]:
        texts: list[str] = []
        for uri in batch["transcript_uri"]:
            try:
                texts.extend(s.text for s in load_sentences(str(uri), s3, gap))
            except TranscriptError:
                continue  # recorded per video by the tokenize step
        return {"text": texts}

    dataset = ray.data.from_items([{"transcript_uri": u} for u in sorted(uris)])
    rows = dataset.map_batches(parse, batch_size=16).take_all()
    return [row["text"] for row in rows]


def resolve_tokenizer(config: ExperimentConfig, videos: pa.Table) -> str:
    """URI of the text tokenizer to use, training or building it when needed (module rule 2)."""
    text, s3 = config.text, config.s3
    if text.vocab:
        tokenizer = TextTokenizer.from_vocab_file(text.vocab, text.lowercase, s3)
        uri = Layout(config.output).tokenizer(tokenizer.version)
        if not storage.exists(storage.join(uri, "meta.json"), s3):
            tokenizer.save(uri, s3)
        return uri
    existing = latest_tokenizer(
        config.output, s3, source="trained", lowercase=text.lowercase, requested_vocab_size=text.vocab_size
    )
    if existing and not text.retrain:
        return existing
    sentences = corpus_sentences(config, videos)
    if not sentences:
        log.warning("no usable transcripts in the corpus: the tokenizer holds only its special tokens")
    tokenizer = TextTokenizer.train(sentences, text.vocab_size, text.lowercase)
    log.info("trained a %d-token WordPiece vocabulary on %d sentences", tokenizer.vocab_size, len(sentences))
    return tokenizer.save_to_output(config.output, s3)


def _pool(num_batches: int) -> dict[str, Any]:
    """Actor pool size and resources: one actor per GPU, else a few CPU actors."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return {"concurrency": min(gpus, num_batches), "num_gpus": 1}
    cpus = int(resources.get("CPU", 1))
    return {"concurrency": max(1, min(num_batches, cpus // 2, 8)), "num_cpus": 1}


def manifest_updates(videos: pa.Table, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows to append: transcript errors that changed, and videos whose features failed."""
    rows_by_id = {row["video_id"]: row for row in videos.to_pylist()}
    updates = []
    for result in results:
        row = dict(rows_by_id[result["video_id"]])
        row.pop("updated_at", None)
        if result["error"]:
            updates.append({**row, "status": "error", "error": result["error"]})
        elif (result["transcript_error"] or None) != (row.get("transcript_error") or None):
            updates.append({**row, "transcript_error": result["transcript_error"]})
    return updates


def run(config: ExperimentConfig) -> dict[str, Any]:
    output, s3 = config.output, config.s3
    codebook_uri = latest_codebook(output, s3, k=config.codebook.k, depth=config.codebook.depth)
    if codebook_uri is None:
        raise storage.StorageError(
            f"no codebook with k={config.codebook.k} depth={config.codebook.depth} under "
            f"{Layout(output).codebooks}: run `videobert fit-codebook` first"
        )
    codebook_version = HierarchicalCodebook.load(codebook_uri, s3).version
    manifest = read_manifest(output, s3)
    videos = _ok_videos(manifest)
    init_ray()
    tokenizer_uri = resolve_tokenizer(config, videos)
    tokenizer_version = TextTokenizer.load(tokenizer_uri, s3).version
    directory = Layout(output).tokens(codebook_version, tokenizer_version)
    files = {storage.stem(f): f for f in storage.list_files(directory, s3, suffix=".parquet")}
    made_from = {
        row["video_id"]: inputs_key(row)
        for row in read_tokens_manifest(output, codebook_version, tokenizer_version, s3).to_pylist()
    }
    # Transcript ETags are read before tokenizing: one that changes meanwhile is redone next run.
    etags = transcript_etags([u for u in videos.column("transcript_uri").to_pylist() if u], config.source, s3)
    inputs = {
        row["video_id"]: token_inputs(row, etags.get(row["transcript_uri"])) for row in videos.to_pylist()
    }
    done = {v for v, want in inputs.items() if v in files and made_from.get(v) == inputs_key(want)}
    todo = videos.filter(pc.invert(pc.is_in(videos.column("video_id"), pa.array(sorted(done), pa.string()))))
    # Videos the manifest now marks `error` have no features: tokens made from older ones are stale.
    failed = set(manifest.column("video_id").to_pylist()) - set(inputs)
    removed = sorted(failed & set(files))
    for vid in removed:
        storage.delete(files[vid], s3)
    summary: dict[str, Any] = {
        "tokens_dir": directory,
        "codebook_version": codebook_version,
        "tokenizer_version": tokenizer_version,
        "tokenizer_uri": tokenizer_uri,
        "videos_done_before": len(done),
        "videos_changed": sum(1 for v in todo.column("video_id").to_pylist() if v in files),
        "videos_removed": len(removed),
        "videos_tokenized": 0,
        "segments": 0,
        "transcript_errors": 0,
        "errors": 0,
    }
    if todo.num_rows == 0:
        log.info("tokens in %s are up to date (%d videos)", directory, len(done))
        return summary
    log.info(
        "tokenizing %d videos (%d changed since their tokens were made; %d up to date)",
        todo.num_rows,
        summary["videos_changed"],
        len(done),
    )

    import ray

    items = [
        {"video_id": v, "transcript_uri": t or ""}
        for v, t in zip(
            todo.column("video_id").to_pylist(), todo.column("transcript_uri").to_pylist(), strict=True
        )
    ]
    num_batches = -(-len(items) // VIDEOS_PER_BATCH)
    results = (
        ray.data.from_items(items)
        .map_batches(
            TokenShardWriter,
            fn_constructor_kwargs={
                "output": output,
                "codebook_uri": codebook_uri,
                "tokenizer_uri": tokenizer_uri,
                "segment_tokens": config.tokenize.segment_tokens,
                "sentence_gap_s": config.tokenize.sentence_gap_s,
                "s3": s3,
            },
            batch_size=VIDEOS_PER_BATCH,
            batch_format="numpy",
            **_pool(num_batches),
        )
        .take_all()
    )
    updates = manifest_updates(todo, results)
    append_manifest(output, updates, s3)
    # The token files are written (by the actors); now record what each was made from.
    made = [
        {"video_id": r["video_id"], **inputs[r["video_id"]], "segments": int(r["segments"])}
        for r in results
        if not r["error"]
    ]
    append_tokens_manifest(output, codebook_version, tokenizer_version, made, s3)
    compact_tokens_manifest(output, codebook_version, tokenizer_version, s3)
    # A video whose features cannot be read now must not keep tokens made from older ones.
    for r in results:
        if r["error"] and r["video_id"] in files:
            storage.delete(files[r["video_id"]], s3)
    summary["videos_tokenized"] = sum(1 for r in results if not r["error"])
    summary["segments"] = sum(int(r["segments"]) for r in results)
    summary["transcript_errors"] = sum(1 for r in results if r["transcript_error"])
    summary["errors"] = sum(1 for r in results if r["error"])
    log.info(
        "tokenized %d videos into %d segments in %s",
        summary["videos_tokenized"],
        summary["segments"],
        directory,
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("tokenize", run, argv)


if __name__ == "__main__":
    sys.exit(main())
