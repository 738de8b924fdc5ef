"""Video embeddings from a trained VideoBERT: a video's visual words -> pooled hidden states.

A video is fed as the training's video-only input, `[CLS] video [SEP]` with token type video
(`training_examples.build_sequence`), in chunks of at most `max_len` tokens: a video longer than
`max_len - 2` words is split into ceil(n / (max_len - 2)) chunks of near-equal length, so no
chunk is a short remainder with little context. Per video:

- `embedding`: the mean of the last hidden states over every video token of every chunk
  (token-weighted: with one chunk it is simply the mean over the video tokens);
- `cls_embedding`: the mean over chunks of the last hidden state at `[CLS]`.

Chunks of many videos run as padded batches, shortest with shortest; padding is masked out of
attention (`seq_ids`), so a video's embedding does not depend on its batch mates.
Ray-free: pipelines/embed.py maps `VideoEmbedder` over actors and commits with `EmbedCommitter`.
`VideoFileEmbedder` runs the same chain (decode_video, ClipWords, `embedding_rows`) in one
process for the registered model's video interface (videobert/registry.py), so both give a
video the same words and the same embedding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from videobert import storage, tables
from videobert.config import ConfigError, DecodeConfig, EncoderConfig, ExperimentConfig, S3Config
from videobert.model import JointVocab, VideoBert
from videobert.results import EmbedResult
from videobert.videos import ManifestCommitter

if TYPE_CHECKING:  # mlflow loads only when a model is resolved
    from videobert.registry import ModelVersionInfo
from videobert.training_examples import VIDEO, build_sequence


def chunk_words(words: np.ndarray, max_len: int) -> list[np.ndarray]:
    """A video's visual words in near-equal chunks that fit `[CLS] chunk [SEP]` in `max_len` tokens."""
    budget = max_len - 2
    if budget < 1:
        raise ValueError(f"max_len {max_len} leaves no room for video tokens")
    if len(words) == 0:
        raise ValueError("a video needs at least one visual word")
    return np.array_split(np.asarray(words, np.int64), -(-len(words) // budget))


@dataclass
class VideoEmbeddings:
    """Per video, in input order."""

    embedding: np.ndarray  # [N, H] float32
    cls_embedding: np.ndarray  # [N, H] float32
    num_chunks: np.ndarray  # [N] int64


def pooled_embeddings(
    model: VideoBert,
    vocab: JointVocab,
    videos: Sequence[np.ndarray],
    max_len: int,
    chunks_per_pass: int = 64,
    features: Sequence[np.ndarray] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embedding [N, H], cls_embedding [N, H], chunks [N]) of each video (its codebook ids in
    clip order), float64 on the model's device (see the module doc). Differentiable: classification
    fine-tuning (videobert/classification.py) trains through it; `embed_videos` runs it without grad.
    A model that takes clip features (`video_input` features / both) needs `features`: each
    video's [clips, dim] features, in clip order like its words."""
    if max_len > model.config.max_positions:
        raise ValueError(f"max_len {max_len} exceeds the model's max_positions {model.config.max_positions}")
    takes_features = model.config.takes_features
    if takes_features and features is None:
        raise ValueError(
            f"the model takes clip features (video_input {model.config.video_input!r}): pass them"
        )
    no_text = np.empty(0, np.int64)
    # (video, ids, token types, clip features of the chunk or None)
    chunks: list[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]] = []
    for video, words in enumerate(videos):
        if len(words) and not 0 <= int(np.min(words)) <= int(np.max(words)) < vocab.num_visual:
            raise ValueError(f"visual word outside the model's {vocab.num_visual} words")
        clip_features = None
        if takes_features:
            clip_features = np.asarray(features[video], np.float32)
            if len(clip_features) != len(words):
                raise ValueError(
                    f"video {video}: {len(words)} visual words but {len(clip_features)} clip features"
                )
        start = 0
        for chunk in chunk_words(words, max_len):
            part = None if clip_features is None else clip_features[start : start + len(chunk)]
            start += len(chunk)
            chunks.append((video, *build_sequence(vocab, VIDEO, no_text, chunk, max_len), part))
    device = next(model.parameters()).device
    hidden_size = model.config.hidden
    token_sums = torch.zeros(len(videos), hidden_size, dtype=torch.float64, device=device)
    cls_sums = torch.zeros_like(token_sums)
    tokens = torch.zeros(len(videos), dtype=torch.float64, device=device)
    num_chunks = torch.zeros_like(tokens)
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i][1]))  # less padding per pass
    for start in range(0, len(order), chunks_per_pass):
        part = [chunks[i] for i in order[start : start + chunks_per_pass]]
        lengths = [len(ids) for _, ids, _, _ in part]
        width = max(lengths)
        ids = np.zeros((len(part), width), np.int64)
        types = np.zeros_like(ids)
        seq_ids = np.zeros_like(ids)  # 1 = real token, 0 = padding
        video_tokens = np.zeros((len(part), width), np.float64)  # 1 between [CLS] and [SEP]
        feature_positions, feature_rows = [], []
        for row, (_, chunk_ids, chunk_types, chunk_features) in enumerate(part):
            n = len(chunk_ids)
            ids[row, :n], types[row, :n], seq_ids[row, :n] = chunk_ids, chunk_types, 1
            video_tokens[row, 1 : n - 1] = 1.0
            if chunk_features is not None:  # the clips sit between [CLS] and [SEP]
                feature_positions.append(row * width + 1 + np.arange(n - 2))
                feature_rows.append(chunk_features)
        inputs = {}
        if takes_features:
            inputs = {
                "feature_positions": torch.as_tensor(np.concatenate(feature_positions), device=device),
                "features": torch.as_tensor(np.concatenate(feature_rows), device=device),
            }
        # No padding in this pass: no mask, which lets SDPA take its fastest kernel.
        mask = None if min(lengths) == width else torch.as_tensor(seq_ids, device=device)
        hidden = model.encode(
            torch.as_tensor(ids, device=device), torch.as_tensor(types, device=device), seq_ids=mask, **inputs
        ).double()  # [R, T, H]
        weights = torch.as_tensor(video_tokens, device=device)  # [R, T]
        owner = torch.as_tensor([video for video, _, _, _ in part], device=device)  # [R]
        # Out of place (index_add, not index_add_): autograd keeps every pass's contribution.
        token_sums = token_sums.index_add(
            0, owner, (hidden * weights.unsqueeze(-1)).sum(1)
        )  # [R, T, H] -> [R, H]
        cls_sums = cls_sums.index_add(0, owner, hidden[:, 0])
        tokens = tokens.index_add(0, owner, weights.sum(1))
        num_chunks = num_chunks.index_add(0, owner, torch.ones_like(owner, dtype=torch.float64))
    return token_sums / tokens.unsqueeze(-1), cls_sums / num_chunks.unsqueeze(-1), num_chunks


@torch.no_grad()
def embed_videos(
    model: VideoBert,
    vocab: JointVocab,
    videos: Sequence[np.ndarray],
    max_len: int,
    chunks_per_pass: int = 64,
    features: Sequence[np.ndarray] | None = None,
) -> VideoEmbeddings:
    """Embed each video (its codebook ids in clip order, and its clip features when the model
    takes them) with `model` (see the module doc)."""
    embedding, cls_embedding, num_chunks = pooled_embeddings(
        model, vocab, videos, max_len, chunks_per_pass, features
    )
    return VideoEmbeddings(
        embedding=embedding.float().cpu().numpy(),
        cls_embedding=cls_embedding.float().cpu().numpy(),
        num_chunks=num_chunks.cpu().numpy().astype(np.int64),
    )


# ---- the embed stage's library parts (Ray glue: pipelines/embed.py) -----------------------------

DECODED, REUSED = "decoded", "reused"

EMBED_RESULT_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("error", pa.string()),
        ("num_clips", pa.int64()),
        ("num_chunks", pa.int64()),
        ("embedding", pa.list_(pa.float32())),
        ("cls_embedding", pa.list_(pa.float32())),
        ("visual_words", pa.list_(pa.int32())),
    ]
)
"""What a VideoEmbedder returns per video: an embedding, or the reason there is none."""


def embedding_max_len(model: VideoBert, metadata: dict[str, Any]) -> int:
    """Tokens per `[CLS] chunk [SEP]` pass: the version's training sequence length (metadata.json)."""
    return min(int(metadata.get("max_seq_len", model.config.max_positions)), model.config.max_positions)


def embedding_rows(
    model: VideoBert,
    vocab: JointVocab,
    max_len: int,
    ids: Sequence[str],
    words: dict[str, np.ndarray],
    errors: dict[str, str],
    features: dict[str, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """One EMBED_RESULT_SCHEMA row per id, in order: the embedding of its `words`, or its error
    (from `errors`; a failed forward pass, e.g. out of memory, marks every video it held)."""
    errors = dict(errors)
    good = [vid for vid in ids if vid in words and vid not in errors]
    embedded: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    try:
        if good:
            clip_features = None if features is None else [features[v] for v in good]
            result = embed_videos(model, vocab, [words[v] for v in good], max_len, features=clip_features)
            for i, vid in enumerate(good):
                embedded[vid] = (result.embedding[i], result.cls_embedding[i], int(result.num_chunks[i]))
    except Exception as error:  # recorded as the videos' errors, never raised
        errors.update({vid: f"embed: {type(error).__name__}: {error}" for vid in good})
    rows = []
    for vid in ids:
        embedding, cls_embedding, chunks = embedded.get(vid, (None, None, 0))
        video_words = words.get(vid)
        rows.append(
            {
                "video_id": vid,
                "error": errors.get(vid),
                "num_clips": 0 if video_words is None else len(video_words),
                "num_chunks": chunks,
                "embedding": None if embedding is None else embedding.tolist(),
                "cls_embedding": None if cls_embedding is None else cls_embedding.tolist(),
                "visual_words": None if video_words is None else video_words.astype(np.int32).tolist(),
            }
        )
    return rows


class VideoEmbedder:
    """One registered model version (loaded once per actor) turning batches of videos into
    embeddings. A video comes with its visual words, or with extract's features file, whose
    words are assigned here with the model's codebook."""

    def __init__(self, model_uri: str, tracking_uri: str, codebook_uri: str, s3: S3Config) -> None:
        from videobert.registry import load_registered_model
        from videobert.tracking import use_tracking_uri

        use_tracking_uri(tracking_uri)  # a fresh worker process: point it at the registry
        model, self.vocab, meta = load_registered_model(model_uri)
        self.model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.max_len = embedding_max_len(model, meta)
        self.codebook_uri, self.s3 = codebook_uri, s3
        self.codebook = None  # loaded on first use: only reused features need it here
        self.takes_features = model.config.takes_features

    def words_from_features(self, features_uri: str) -> np.ndarray:
        return self.words_and_features(features_uri)[0]

    def words_and_features(self, features_uri: str) -> tuple[np.ndarray, np.ndarray]:
        """A features file's visual words (the model's codebook) and its features, by clip_index."""
        from videobert.codebook import HierarchicalCodebook, default_device
        from videobert.token_shards import features_array

        if self.codebook is None:
            self.codebook = HierarchicalCodebook.load(self.codebook_uri, self.s3).to(default_device())
        table = storage.read_parquet(features_uri, self.s3).sort_by("clip_index")
        if table.num_rows == 0:
            raise ValueError("features file has no clips")
        clip_features = features_array(table)
        return self.codebook.assign(clip_features), clip_features

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = [str(v) for v in batch["video_id"]]
        words: dict[str, np.ndarray] = {}
        errors: dict[str, str] = {}
        features: dict[str, np.ndarray] | None = {} if self.takes_features else None
        carried = batch.get("features")  # decoded videos' features, for a model that takes them
        for n, (vid, video_words, features_uri) in enumerate(
            zip(ids, batch["visual_words"], batch["features_uri"], strict=True)
        ):
            try:
                if features_uri:
                    words[vid], clip_features = self.words_and_features(str(features_uri))
                else:
                    words[vid] = np.asarray(video_words, np.int64)
                    clip_features = None
                    if features is not None:
                        if carried is None:
                            raise ValueError("the model takes clip features; none came with the video")
                        clip_features = np.asarray(carried[n], np.float16).reshape(len(words[vid]), -1)
                if features is not None:
                    features[vid] = clip_features
            except Exception as error:  # recorded as the video's error row, never raised
                errors[vid] = (
                    f"features: cannot reuse {features_uri}: {type(error).__name__}: {error} "
                    "(rerun with embed.reuse_features=false to decode the video instead)"
                )
        rows = embedding_rows(self.model, self.vocab, self.max_len, ids, words, errors, features)
        return pa.Table.from_pylist(rows, schema=EMBED_RESULT_SCHEMA)


class VideoFileEmbedder:
    """Video files -> embeddings in this process, through the chain `videobert embed` runs on Ray:
    `decode_video` (decode's bounds), `ClipWords` (S3D, then the codebook), then `embedding_rows`.
    Encoder and codebook are built once; the registered model's video interface holds one."""

    def __init__(
        self,
        model: VideoBert,
        vocab: JointVocab,
        max_len: int,
        encoder: EncoderConfig,
        decode: DecodeConfig,
        codebook_uri: str,
        s3: S3Config,
    ) -> None:
        from videobert.videos import ClipWords

        self.model, self.vocab, self.max_len = model, vocab, max_len
        self.decode, self.s3, self.clips_per_batch = decode, s3, encoder.clips_per_batch
        self.takes_features = model.config.takes_features
        self.words = ClipWords(encoder, decode, s3, codebook_uri, keep_features=self.takes_features)

    def __call__(self, videos: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`videos`: dicts with `video_id`, `source_uri` and, optionally, a window `start_s` /
        `end_s` (videos.clip_window). One EMBED_RESULT_SCHEMA row per video, in order."""
        from videobert.videos import decoded_videos_here

        words: dict[str, np.ndarray] = {}
        errors: dict[str, str] = {}
        features: dict[str, np.ndarray] | None = {} if self.takes_features else None
        for video in decoded_videos_here(videos, self.decode, self.s3, self.words, self.clips_per_batch):
            if video.error:
                errors[video.video_id] = video.error
            else:
                words[video.video_id] = video.visual_words()
                if features is not None:
                    features[video.video_id] = video.clip_features()
        ids = [v["video_id"] for v in videos]
        return embedding_rows(self.model, self.vocab, self.max_len, ids, words, errors, features)


def check_compatible(model: ModelVersionInfo, codebook_meta: dict[str, Any], encoder: str) -> None:
    """The model's codebook must match its vocabulary and the encoder this config builds."""
    if int(codebook_meta["vocab_size"]) != model.num_visual:
        raise ConfigError(
            f"{model.uri}: its codebook has {codebook_meta['vocab_size']} visual words but the model "
            f"knows {model.num_visual}"
        )
    from videobert.codebook import fitted_encoders

    fitted_on = fitted_encoders(codebook_meta)
    if fitted_on and encoder not in fitted_on:
        raise ConfigError(
            f"{model.uri}: its codebook was fit on {', '.join(fitted_on)} features, but the encoder "
            f"section gives {encoder}; set encoder.weights / encoder.seed to the model's encoder"
        )


def model_codebook(
    model: ModelVersionInfo, config: ExperimentConfig, encoder: str
) -> tuple[str, dict[str, Any]]:
    """(URI, codebook.json) of the version's codebook, checked to fit its vocabulary and the
    `encoder` this config builds (`check_compatible`); ConfigError when it does not or is gone."""
    from videobert.codebook import METADATA_FILE

    codebook_uri = model.metadata.get("codebook_uri")
    if not codebook_uri:
        raise ConfigError(f"{model.uri}: its metadata.json names no codebook_uri")
    try:
        codebook_meta = json.loads(storage.read_bytes(storage.join(codebook_uri, METADATA_FILE), config.s3))
    except FileNotFoundError as error:
        raise ConfigError(f"{model.uri}: its codebook {codebook_uri} is gone ({error})") from error
    check_compatible(model, codebook_meta, encoder)
    return codebook_uri, codebook_meta


def reusable_features(config: ExperimentConfig, encoder: str) -> dict[str, str]:
    """video_id -> ETag of every video with extract's committed features from this encoder."""
    manifest = tables.read_manifest(config.output, config.s3)
    return {
        row["video_id"]: row["etag"]
        for row in manifest.select(["video_id", "status", "etag", "encoder"]).to_pylist()
        if row["status"] == "ok" and row["encoder"] == encoder
    }


class EmbedCommitter(ManifestCommitter):
    """Commits each embedded (or failed) video: its embedding file, then its manifest row."""

    def __init__(
        self,
        config: ExperimentConfig,
        layout: tables.EmbeddingLayout,
        videos: list[dict[str, Any]],
        provenance: dict[str, str],
        summary: EmbedResult,
        current: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(
            lambda rows: tables.upsert(
                layout.manifest, tables.rows_table(rows, tables.EMBED_MANIFEST_SCHEMA), config.s3
            ),
            config.extract.manifest_flush_every,
            summary,
            config.s3,
            current,
        )
        self.layout = layout
        self.videos = {v["video_id"]: v for v in videos}
        self.provenance = provenance  # model_uri, codebook_version, encoder
        self.features: dict[str, str] = {}  # video_id -> DECODED | REUSED

    def commit_video(
        self,
        vid: str,
        error: str | None,
        result: dict[str, Any] | None = None,
        error_kind: str = tables.TRANSIENT,
    ) -> None:
        """`error_kind` of a failed video: decode errors bring theirs; a failed model pass is
        the worker's trouble (transient)."""
        video = self.videos[vid]
        num_clips = int(result["num_clips"]) if result and not error else 0
        output = None
        if error is None:
            row = {
                **{k: video[k] for k in ("video_id", "source_uri", "etag")},
                **self.provenance,
                **{k: result[k] for k in ("num_chunks", "embedding", "cls_embedding", "visual_words")},
                "num_clips": num_clips,
                "run_id": self.summary.run_id,
                "created_at": tables.now_utc(),
            }
            output = pa.Table.from_pylist([row], schema=tables.EMBEDDINGS_SCHEMA)
            self.summary.reused += self.features.get(vid) == REUSED
        manifest_row = {
            **{k: video[k] for k in ("video_id", "source_uri", "etag", "size")},
            "status": "ok" if error is None else "error",
            "error": error,
            "error_kind": None if error is None else error_kind,
            "num_clips": num_clips,
            "features": self.features.get(vid, DECODED),
            "model_uri": self.provenance["model_uri"],
            "encoder": self.provenance["encoder"],
            "run_id": self.summary.run_id,
        }
        self.commit(video, manifest_row, self.layout.data_file(vid), output, error, num_clips)


@dataclass
class EmbedPlan:
    """What an embed run has to do, and with which model version."""

    model: ModelVersionInfo
    codebook_uri: str
    layout: tables.EmbeddingLayout
    provenance: dict[str, str]
    """model_uri, codebook_version and encoder: written into every embedding row."""
    manifest: dict[str, dict[str, Any]]
    """video_id -> its current embed-manifest row."""
    videos: list[dict[str, Any]]
    """Every listed video."""
    reuse: list[dict[str, Any]]
    """Videos to embed from extract's committed features (same ETag and encoder)."""
    decode: list[dict[str, Any]]
    """Videos to decode and encode first."""

    @property
    def todo(self) -> list[dict[str, Any]]:
        return self.reuse + self.decode


def plan_embed(config: ExperimentConfig) -> EmbedPlan:
    """Resolve `embed.model_uri` to one version, check that its codebook fits this config's
    encoder, and list the videos whose embedding is not up to date (`videos.is_up_to_date`)."""
    from videobert.features import encoder_id
    from videobert.registry import resolve_model_version
    from videobert.videos import list_videos, rows_by_video, videos_to_do

    s3 = config.s3
    model = resolve_model_version(config.embed.model_uri)
    encoder = encoder_id(config.encoder)
    codebook_uri, codebook_meta = model_codebook(model, config, encoder)

    root = config.embed.output or tables.Layout(config.output).embeddings
    storage.check_reachable(root, s3, create=True)
    layout = tables.EmbeddingLayout.for_model(root, model.name, model.version)
    videos = list_videos(config)
    manifest = rows_by_video(tables.read_table(layout.manifest, tables.EMBED_MANIFEST_SCHEMA, s3))
    todo = videos_to_do(videos, manifest, config.embed.retry_errors)
    reusable = reusable_features(config, encoder) if config.embed.reuse_features and todo else {}
    return EmbedPlan(
        model=model,
        codebook_uri=codebook_uri,
        layout=layout,
        provenance={"model_uri": model.uri, "codebook_version": codebook_meta["version"], "encoder": encoder},
        manifest=manifest,
        videos=videos,
        reuse=[v for v in todo if reusable.get(v["video_id"]) == v["etag"]],
        decode=[v for v in todo if reusable.get(v["video_id"]) != v["etag"]],
    )
