"""Token shards: each video's clip features + transcript -> aligned segments in `tokens/`.

`TokenShardWriter` is the batch body of the tokenize stage (a Ray Data actor in
pipelines/tokenize.py, but plain Python here): it loads the codebook and the text tokenizer
once, and for a batch of videos reads their features (ordered by clip_index), assigns visual
words in one batched call (GPU when there is one), parses each transcript, aligns, and
writes `tokens/<codebook>-<tokenizer>/<video_id>.parquet` (one file per video, so reruns
overwrite rather than duplicate). It returns one status row per video; nothing is raised
for a bad video.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from videobert import storage
from videobert.align import Segment, align_segments
from videobert.codebook import HierarchicalCodebook, default_device
from videobert.config import ExperimentConfig, S3Config, TokenizeConfig
from videobert.results import CodebookResult, TokenizeResult, TokenizerResult, find_tokenizer
from videobert.tables import (
    FEATURE_DIM,
    TOKENS_SCHEMA,
    TRANSIENT,
    Layout,
    maintain,
    read_manifest,
    read_tokens_manifest,
    upsert_manifest,
    upsert_tokens_manifest,
)
from videobert.text_tokenizer import TextTokenizer
from videobert.transcripts import Sentence, TranscriptError, parse_transcript, to_sentences

log = logging.getLogger(__name__)

STATUS_COLUMNS = ("video_id", "segments", "transcript_error", "error")


DEFAULT_MAX_TRANSCRIPT_BYTES = TokenizeConfig.max_transcript_bytes


def _read_at_most(uri: str, limit: int, s3: S3Config | None) -> bytes:
    """The object's first `limit` bytes at most (a larger object is never read whole)."""

    def read() -> bytes:
        fs, path = storage.filesystem(uri, s3)
        with fs.open_input_stream(path) as stream:
            return stream.read(limit)

    return storage.with_retries(f"read {uri}", read)


def load_sentences(
    transcript_uri: str,
    s3: S3Config | None = None,
    max_gap_s: float = 2.0,
    max_bytes: int = DEFAULT_MAX_TRANSCRIPT_BYTES,
) -> list[Sentence]:
    """Sentences of a sidecar transcript of at most `max_bytes` bytes.

    Raises TranscriptError, and nothing else, when it cannot be used: unreadable, larger than
    `max_bytes` (only max_bytes + 1 bytes are read), or rejected by the parser; an unexpected
    error inside parsing becomes a TranscriptError too, so one hostile file costs its video
    its transcript, never the batch.
    """
    name = transcript_uri.rsplit("/", 1)[-1]
    try:
        data = _read_at_most(transcript_uri, max_bytes + 1, s3)
    except Exception as error:  # OSError, StorageError, or whatever the S3 client raised
        raise TranscriptError(f"{name}: cannot read: {_clip(str(error))}") from error
    if len(data) > max_bytes:
        try:
            info = storage.object_info(transcript_uri, s3)
        except Exception:  # the size is only for the message
            info = None
        size = f"{info.size} bytes" if info is not None else "more bytes"
        raise TranscriptError(
            f"{name}: {size}, over the {max_bytes}-byte limit (tokenize.max_transcript_bytes)"
        )
    try:
        return to_sentences(parse_transcript(data, name), max_gap_s=max_gap_s)
    except TranscriptError:
        raise
    except Exception as error:  # parse_transcript raises only TranscriptError; this is a bug's guard
        raise TranscriptError(f"{name}: cannot parse: {type(error).__name__}: {_clip(str(error))}") from error


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# What a video's token file is made from, as recorded in the tokens manifest: the features
# (source ETag, encoder and the extract run that wrote them) and the transcript's ETag.
INPUT_COLUMNS = ("etag", "encoder", "extract_run_id", "transcript_uri", "transcript_etag")


def token_inputs(video: dict[str, Any], transcript_etag: str | None) -> dict[str, Any]:
    """The tokens-manifest inputs of one `videos/` manifest row (see INPUT_COLUMNS)."""
    return {
        "etag": video.get("etag"),
        "encoder": video.get("encoder"),
        "extract_run_id": video.get("run_id"),
        "transcript_uri": video.get("transcript_uri") or None,
        "transcript_etag": transcript_etag if video.get("transcript_uri") else None,
    }


def inputs_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """Comparable form of a row's INPUT_COLUMNS (a manifest row or `token_inputs` output)."""
    return tuple(row.get(name) for name in INPUT_COLUMNS)


def transcript_etags(uris: list[str], source: str, s3: S3Config | None = None) -> dict[str, str | None]:
    """Current ETag of each transcript URI; None when it is gone.

    One listing of `source` (where extract found the sidecars) answers most of them; any it
    does not cover is looked up on its own.
    """
    wanted = set(uris)
    found: dict[str, str | None] = {}
    if wanted:
        try:
            found = {o.uri: o.etag for o in storage.list_objects(source, s3) if o.uri in wanted}
        except storage.StorageError:
            found = {}  # source unreachable: fall back to one lookup per transcript
    for uri in sorted(wanted - set(found)):
        info = storage.object_info(uri, s3)
        found[uri] = info.etag if info else None
    return found


def features_array(table: pa.Table) -> np.ndarray:
    """The `feature` column as an (N, dim) float16 array."""
    column = table.column("feature").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), -1) if len(column) else np.empty((0, FEATURE_DIM), np.float16)


def segment_clip_rows(
    starts: np.ndarray, ends: np.ndarray, segment_start: float, segment_end: float
) -> np.ndarray:
    """Rows (in clip_index order) of the clips a token row's video tokens came from.

    Token rows keep no clip indices; `videobert.align` rebuilds them exactly from the row's
    times: a sentence segment holds every clip that overlaps the sentence, a video-only segment
    (times = its first clip's start and last clip's end) the clips inside it, and both are the
    clips overlapping [start_s, end_s] under align's half-open rule."""
    if segment_start == segment_end:
        return np.flatnonzero((starts <= segment_start) & (segment_start < ends))
    return np.flatnonzero((starts < segment_end) & (ends > segment_start))


class FeatureJoiner:
    """Token rows -> their clips' features, read from extract's `features/` tables.

    The data contract of `tokens/` does not change (no features column, so tokenize writes
    nothing new and old shards still work): a model with `model.video_input` features or both
    joins each row with the features of its video (by video_id) and its clips (by time, see
    `segment_clip_rows`). A row whose clip count differs from its video tokens means the
    features changed since tokenize ran: a ValueError that says to rerun tokenize.
    Keeps the last `cache_videos` videos' features in memory (a token shard's rows come video
    by video, and a small corpus is replayed from memory every epoch).
    """

    def __init__(self, output: str, s3: S3Config | None = None, cache_videos: int = 256) -> None:
        self.layout = Layout(output)
        self.s3 = s3
        self.cache_videos = cache_videos
        self._cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def clips(self, vid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start_s, end_s, features [N, dim] float16) of a video's clips, by clip_index."""
        if vid in self._cache:
            return self._cache[vid]
        try:
            table = storage.read_parquet(self.layout.features_file(vid), self.s3).sort_by("clip_index")
        except Exception as error:
            raise ValueError(
                f"video {vid}: cannot read its clip features for model.video_input features/both "
                f"({self.layout.features_file(vid)}): {error}"
            ) from error
        entry = (
            table.column("start_s").to_numpy(),
            table.column("end_s").to_numpy(),
            features_array(table),
        )
        if len(self._cache) >= self.cache_videos:
            self._cache.pop(next(iter(self._cache)))
        self._cache[vid] = entry
        return entry

    def features(self, vid: str, start_s: float, end_s: float, num_tokens: int) -> np.ndarray:
        """[num_tokens, dim] float16 features of one token row's clips."""
        if num_tokens == 0:
            return np.zeros((0, FEATURE_DIM), np.float16)
        starts, ends, feats = self.clips(vid)
        rows = segment_clip_rows(starts, ends, float(start_s), float(end_s))
        if len(rows) != num_tokens:
            raise ValueError(
                f"video {vid} segment [{start_s}, {end_s}]: {num_tokens} video tokens but {len(rows)} "
                "clips in its features: the features changed since tokenize ran (rerun tokenize)"
            )
        return feats[rows]

    def __call__(self, columns: dict[str, Any]) -> dict[str, Any]:
        """Columns with video_id, start_s, end_s, video_tokens -> the same plus `video_features`
        (one [clips, dim] float16 array per row)."""
        joined = [
            self.features(str(vid), start, end, len(tokens) if tokens is not None else 0)
            for vid, start, end, tokens in zip(
                columns["video_id"],
                columns["start_s"],
                columns["end_s"],
                columns["video_tokens"],
                strict=True,
            )
        ]
        return {**columns, "video_features": joined}


def segments_table(
    segments: list[Segment], text_ids: list[list[int]], codebook_version: str, tokenizer_version: str
) -> pa.Table:
    columns: dict[str, list[Any]] = {
        "video_id": [s.video_id for s in segments],
        "segment_index": [s.segment_index for s in segments],
        "start_s": [s.start_s for s in segments],
        "end_s": [s.end_s for s in segments],
        "text": [s.text for s in segments],
        "text_ids": text_ids,
        "video_tokens": [s.video_tokens for s in segments],
        "codebook_version": [codebook_version] * len(segments),
        "tokenizer_version": [tokenizer_version] * len(segments),
    }
    return pa.table(columns, schema=TOKENS_SCHEMA)


class TokenShardWriter:
    """Batch of videos (columns video_id, transcript_uri) -> token files + status rows."""

    def __init__(
        self,
        output: str,
        codebook_uri: str,
        tokenizer_uri: str,
        segment_tokens: int,
        sentence_gap_s: float = 2.0,
        s3: S3Config | None = None,
        device: str | None = None,
        max_transcript_bytes: int = DEFAULT_MAX_TRANSCRIPT_BYTES,
    ):
        self.output = output
        self.s3 = s3
        self.max_transcript_bytes = max_transcript_bytes
        self.segment_tokens = segment_tokens
        self.sentence_gap_s = sentence_gap_s
        self.codebook = HierarchicalCodebook.load(codebook_uri, s3).to(device or default_device())
        self.tokenizer = TextTokenizer.load(tokenizer_uri, s3)
        self.codebook_version = self.codebook.version
        self.tokenizer_version = self.tokenizer.version
        self.layout = Layout(output)
        self.directory = self.layout.tokens(self.codebook_version, self.tokenizer_version)

    def token_file(self, vid: str) -> str:
        return storage.join(self.directory, f"{vid}.parquet")

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        status: dict[str, list[Any]] = {name: [] for name in STATUS_COLUMNS}
        videos: list[tuple[str, Any, pa.Table]] = []
        for vid, transcript_uri in zip(batch["video_id"], batch["transcript_uri"], strict=True):
            try:
                table = storage.read_parquet(self.layout.features_file(str(vid)), self.s3)
                table = table.sort_by("clip_index")
                if table.num_rows == 0:
                    raise ValueError("features file has no clips")
            except Exception as error:  # recorded as the video's error row, never raised
                self._record(status, str(vid), 0, None, f"tokenize: features unreadable: {error}")
                continue
            videos.append((str(vid), transcript_uri, table))
        if not videos:
            return status
        # One assignment call for the whole batch: big matmuls on the GPU.
        words = self.codebook.assign(np.concatenate([features_array(t) for _, _, t in videos]))
        offset = 0
        for vid, transcript_uri, table in videos:
            video_words = words[offset : offset + table.num_rows].tolist()
            offset += table.num_rows
            sentences, transcript_error = None, None
            if transcript_uri:
                try:
                    sentences = load_sentences(
                        str(transcript_uri), self.s3, self.sentence_gap_s, self.max_transcript_bytes
                    )
                except Exception as error:  # load_sentences raises TranscriptError; never lose the batch
                    transcript_error = str(error) if isinstance(error, TranscriptError) else repr(error)
            clips = list(
                zip(
                    table.column("clip_index").to_pylist(),
                    table.column("start_s").to_pylist(),
                    table.column("end_s").to_pylist(),
                    strict=True,
                )
            )
            segments = align_segments(vid, clips, video_words, sentences, self.segment_tokens)
            text_ids = [self.tokenizer.encode(s.text) if s.text else [] for s in segments]
            out = segments_table(segments, text_ids, self.codebook_version, self.tokenizer_version)
            storage.write_parquet(out, self.token_file(vid), self.s3)
            self._record(status, vid, len(segments), transcript_error, None)
        return status

    @staticmethod
    def _record(
        status: dict[str, list[Any]], vid: str, segments: int, transcript_error: str | None, error: str | None
    ) -> None:
        status["video_id"].append(vid)
        status["segments"].append(segments)
        status["transcript_error"].append(transcript_error)
        status["error"].append(error)


def read_tokens(
    output: str, codebook_version: str, tokenizer_version: str, s3: S3Config | None = None
) -> pa.Table:
    """Every segment of one token version, ordered by video and segment (empty if none)."""
    table = storage.read_parquet_dir(Layout(output).tokens(codebook_version, tokenizer_version), s3)
    if table is None or table.num_rows == 0:
        return TOKENS_SCHEMA.empty_table()
    table = table.select(TOKENS_SCHEMA.names).cast(TOKENS_SCHEMA)
    return table.sort_by([("video_id", "ascending"), ("segment_index", "ascending")])


# ---- the tokenize stage's plan (Ray glue: pipelines/tokenize.py) ------------------------------


def sentences_of_transcripts(
    uris: list[str],
    s3: S3Config | None,
    max_gap_s: float,
    max_bytes: int = DEFAULT_MAX_TRANSCRIPT_BYTES,
) -> list[str]:
    """Sentences of every usable transcript among `uris` (one that cannot be used is skipped
    here: tokenize records its error per video)."""
    texts: list[str] = []
    for uri in uris:
        try:
            texts.extend(s.text for s in load_sentences(uri, s3, max_gap_s, max_bytes))
        except TranscriptError:
            continue
    return texts


def ensure_tokenizer(config: ExperimentConfig, corpus_sentences: Callable[[], list[str]]) -> TokenizerResult:
    """The tokenizer the `text` section selects (`results.find_tokenizer`), built or trained
    and saved when it does not exist yet, or retrained with `text.retrain`.

    `text.vocab` set: built from that vocab file. Otherwise the newest tokenizer trained with
    this vocab_size and lower-casing is reused, and one is trained on `corpus_sentences()` only
    when none exists: a new corpus alone does not retrain it, so token versions stay stable
    while videos are added.
    """
    text, s3 = config.text, config.s3
    existing = find_tokenizer(config)
    if existing is not None and (text.vocab or not text.retrain):
        return existing
    if text.vocab:
        tokenizer = TextTokenizer.from_vocab_file(text.vocab, text.lowercase, s3)
    else:
        sentences = corpus_sentences()
        if not sentences:
            log.warning("no usable transcripts in the corpus: the tokenizer holds only its special tokens")
        tokenizer = TextTokenizer.train(sentences, text.vocab_size, text.lowercase)
        log.info(
            "trained a %d-token WordPiece vocabulary on %d sentences", tokenizer.vocab_size, len(sentences)
        )
    return TokenizerResult(tokenizer.save_to_output(config.output, s3), tokenizer.version)


@dataclass
class TokenizePlan:
    """What a tokenize run has to do for one (codebook, tokenizer) pair."""

    result: TokenizeResult
    videos: pa.Table
    """The manifest's `ok` rows to tokenize."""
    inputs: dict[str, dict[str, Any]]
    """video_id -> what its token file is made from now (tokens-manifest INPUT_COLUMNS)."""
    existing_files: dict[str, str]
    """video_id -> its token file, for every file already in the directory."""

    def items(self) -> list[dict[str, str]]:
        """The rows the TokenShardWriter actors take."""
        return [
            {"video_id": v, "transcript_uri": t or ""}
            for v, t in zip(
                self.videos.column("video_id").to_pylist(),
                self.videos.column("transcript_uri").to_pylist(),
                strict=True,
            )
        ]


def plan_tokenize(
    config: ExperimentConfig, codebook: CodebookResult, tokenizer: TokenizerResult
) -> TokenizePlan:
    """Compare the `ok` videos with the tokens manifest; remove token files of videos that
    failed since (they were made from features that no longer count).

    Labelled videos (`evaluate.labels`) are left out, and any token file of theirs is removed:
    zero-shot scores every one of them, so none may be trained on. Evaluate tokenizes them
    into their own tables (`evaluation.evalset_root`) with the same code.
    """
    from videobert.evaluation import labelled_video_ids

    output, s3 = config.output, config.s3
    manifest = read_manifest(output, s3)
    ok = manifest.filter(pc.equal(manifest.column("status"), "ok"))
    labelled = pa.array(sorted(labelled_video_ids(config)), pa.string())
    ok = ok.filter(pc.invert(pc.is_in(ok.column("video_id"), labelled)))
    directory = Layout(output).tokens(codebook.version, tokenizer.version)
    files = {storage.stem(f): f for f in storage.list_files(directory, s3, suffix=".parquet")}
    made_from = {
        row["video_id"]: inputs_key(row)
        for row in read_tokens_manifest(output, codebook.version, tokenizer.version, s3).to_pylist()
    }
    # Transcript ETags are read before tokenizing: one that changes meanwhile is redone next run.
    etags = transcript_etags([u for u in ok.column("transcript_uri").to_pylist() if u], config.source, s3)
    inputs = {row["video_id"]: token_inputs(row, etags.get(row["transcript_uri"])) for row in ok.to_pylist()}
    done = {v for v, want in inputs.items() if v in files and made_from.get(v) == inputs_key(want)}
    todo = ok.filter(pc.invert(pc.is_in(ok.column("video_id"), pa.array(sorted(done), pa.string()))))
    removed = sorted((set(manifest.column("video_id").to_pylist()) - set(inputs)) & set(files))
    for vid in removed:
        storage.delete(files.pop(vid), s3)
    result = TokenizeResult(
        directory,
        codebook,
        tokenizer,
        videos_done_before=len(done),
        videos_changed=sum(1 for v in todo.column("video_id").to_pylist() if v in files),
        videos_removed=len(removed),
    )
    return TokenizePlan(result, todo, inputs, files)


def record_tokenized(config: ExperimentConfig, plan: TokenizePlan, statuses: list[dict[str, Any]]) -> None:
    """After the writers wrote the token files: manifest rows for transcript and feature errors,
    then the tokens manifest (what each file was made from), then the counts."""
    output, s3 = config.output, config.s3
    result = plan.result
    rows_by_id = {row["video_id"]: row for row in plan.videos.to_pylist()}
    updates = []
    for status in statuses:
        row = {k: v for k, v in rows_by_id[status["video_id"]].items() if k != "updated_at"}
        if status["error"]:  # unreadable features: extract redoes the video on its next run
            updates.append({**row, "status": "error", "error": status["error"], "error_kind": TRANSIENT})
        elif (status["transcript_error"] or None) != (row.get("transcript_error") or None):
            updates.append({**row, "transcript_error": status["transcript_error"]})
    upsert_manifest(output, updates, s3)
    made = [
        {"video_id": s["video_id"], **plan.inputs[s["video_id"]], "segments": int(s["segments"])}
        for s in statuses
        if not s["error"]
    ]
    codebook_version, tokenizer_version = result.codebook.version, result.tokenizer.version
    upsert_tokens_manifest(output, codebook_version, tokenizer_version, made, s3)
    maintain(Layout(output).tokens_manifest(codebook_version, tokenizer_version), s3)
    # A video whose features cannot be read now must not keep tokens made from older ones.
    for status in statuses:
        if status["error"] and status["video_id"] in plan.existing_files:
            storage.delete(plan.existing_files[status["video_id"]], s3)
    result.videos_tokenized = sum(1 for s in statuses if not s["error"])
    result.segments = sum(int(s["segments"]) for s in statuses)
    result.transcript_errors = sum(1 for s in statuses if s["transcript_error"])
    result.errors = sum(1 for s in statuses if s["error"])
