"""Typed experiment configuration: one YAML file describes a whole experiment.

Every stage takes the same file and reads the sections it needs. Values come from
the dataclass defaults (the paper's recipe), then the YAML file, then `--set a.b=c`
overrides. Unknown keys, values of the wrong type and values that cannot work together are
errors that name the key, raised at load, before any stage starts. A renamed key is still
accepted under its old name, with a DeprecatedConfigKeyWarning naming the new one.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple
from urllib.parse import urlsplit

import yaml

from videobert.model_sizes import MODEL_SIZES


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key.

    The message is redacted (see `redact`): a rejected value may hold credentials, and the
    message goes to stderr and logs.
    """

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


# -- credentials: never in a config, never written anywhere ------------------------------------

# `scheme://userinfo@`: the RFC 3986 userinfo of any URI inside a text.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^\s/?#@'\"]*@")

CREDENTIALS_HELP = (
    "credentials never go into a URI: S3 keys come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
    "(or an instance profile), an MLflow server's login from MLFLOW_TRACKING_USERNAME / "
    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
)

CHECKED_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
"""Environment variables read as URIs: checked like config values (`check_environment`)."""


def redact(text: str) -> str:
    """`text` with the userinfo of every URI in it replaced by `***` (`http://***@host`).

    Defence in depth for whatever is logged or recorded (params, tags, artifacts, errors):
    configs with credentials are rejected at load, but a URI can also come from elsewhere.
    """
    return _USERINFO.sub(r"\g<scheme>***@", text)


def has_credentials(value: str) -> bool:
    """Whether `value` is a URI carrying credentials: `user:password@` or `token@` before its host.

    An http(s) URI (an endpoint or a tracking server) is also refused with an `@` further on,
    where an unescaped `/` in a secret would have moved it out of the host part.
    """
    if "://" not in value or "@" not in value:
        return False
    try:
        parts = urlsplit(value.strip())
    except ValueError:  # e.g. a bad IPv6 host: look at the text itself
        return bool(_USERINFO.search(value))
    if "@" in parts.netloc:
        return True
    return parts.scheme.lower() in ("http", "https") and "@" in parts.path


def check_uri(key: str, value: str) -> None:
    """Raise ConfigError naming `key` (never echoing the value) when `value` carries credentials."""
    if has_credentials(value):
        raise ConfigError(
            f"{key}: the URI holds credentials (user:password@ or token@), refused; {CREDENTIALS_HELP}"
        )


def check_environment(environ: typing.Mapping[str, str] | None = None) -> None:
    """Raise ConfigError when a URI in the environment (CHECKED_URI_ENV) carries credentials."""
    environ = os.environ if environ is None else environ
    for name in CHECKED_URI_ENV:
        value = environ.get(name)
        if value:
            check_uri(f"environment variable {name}", value)


def _check_strings(node: Any, key: str) -> None:
    """check_uri on every string of a config section, recursively (lists included)."""
    if dataclasses.is_dataclass(node):
        for item in dataclasses.fields(node):
            _check_strings(getattr(node, item.name), f"{key}.{item.name}" if key else item.name)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            _check_strings(item, f"{key}[{index}]")
    elif isinstance(node, str):
        check_uri(key, node)


class DeprecatedConfigKeyWarning(FutureWarning):
    """A config key was given under its old name; the message names the new one.

    A FutureWarning, not a DeprecationWarning: those are hidden by default, and the people who
    must see this are the ones writing the YAML files, not the library's developers.
    """


class ModelRef(NamedTuple):
    """A registered model URI, parsed: a named model and either an alias or a version."""

    name: str
    """Registered model name."""
    alias: str | None
    """The alias (e.g. champion) of `models:/<name>@<alias>`, else None."""
    version: str | None
    """The version number of `models:/<name>/<version>`, else None."""


def parse_model_uri(model_uri: str) -> ModelRef:
    """`models:/<name>@<alias>` -> (name, alias, None); `models:/<name>/<version>` -> (name, None, version).

    Raises ConfigError for anything else. Pure string work (no MLflow, no torch), so configs
    are checked at load.
    """
    rest = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else ""
    name, at, alias = rest.partition("@")
    if at and name and alias and "/" not in alias:
        return ModelRef(name, alias, None)
    name, slash, version = rest.rpartition("/")
    if not at and slash and name and version.isdigit():
        return ModelRef(name, None, version)
    raise ConfigError(
        f"model URI must look like models:/<name>@<alias> or models:/<name>/<version>, got {model_uri!r}"
    )


@dataclass
class S3Config:
    """Where S3 lives. Credentials never go here: they come from the standard AWS variables."""

    endpoint_url: str | None = None
    """S3 endpoint (e.g. http://127.0.0.1:9000); falls back to AWS_ENDPOINT_URL."""
    region: str | None = None
    """AWS region; falls back to AWS_REGION / AWS_DEFAULT_REGION, then us-east-1."""
    max_attempts: int = 5
    """Attempts per request, with exponential backoff, before an error is permanent."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("s3.max_attempts must be >= 1")


@dataclass
class DecodeConfig:
    """How videos become clips of frames (paper: 20 fps, 30-frame clips, 224 px)."""

    fps: float = 20.0
    """Frames per second after resampling by timestamps."""
    clip_frames: int = 30
    """Frames per non-overlapping clip (30 frames at 20 fps = 1.5 s)."""
    size: int = 224
    """Output side in pixels: shorter side resized to this, then centre-cropped square."""
    extensions: list[str] = field(default_factory=lambda: ["mp4", "mkv", "webm", "mov", "avi"])
    """File extensions listed as videos under `source`."""
    transcript_extensions: list[str] = field(default_factory=lambda: ["vtt", "srt", "json"])
    """Sidecar transcript extensions, looked up by the video's stem, in this order."""
    max_clips: int | None = None
    """Stop each video after this many clips and keep it ok (None: the whole video); see clip_limit."""
    clip_limit: int = 20_000
    """Hard bound on clips per video: a video that would give more is an error (max_clips stops early)."""
    max_pixels: int = 4096 * 2160
    """Largest frame (width x height) a video may have, in its header or decoded (default DCI 4K)."""
    max_aspect_ratio: float = 8.0
    """Largest long-side / short-side ratio of a frame (21:9 is 2.33, 32:9 is 3.56, 9:16 is 1.78)."""
    max_duration_s: float = 4 * 3600.0
    """Longest video in seconds, by its header or by the timestamps of its frames."""
    max_gap_s: float = 10.0
    """Longest time between frames (or shown by one frame); a longer gap is an error, never filled."""

    def __post_init__(self) -> None:
        if self.fps <= 0:
            raise ConfigError("decode.fps must be > 0")
        if self.clip_frames < 1:
            raise ConfigError("decode.clip_frames must be >= 1")
        if self.size < 32:
            raise ConfigError("decode.size must be >= 32 (S3D downsamples 32x)")
        if self.max_clips is not None and self.max_clips < 1:
            raise ConfigError("decode.max_clips must be >= 1 or null")
        if self.clip_limit < 1:
            raise ConfigError("decode.clip_limit must be >= 1")
        if self.max_pixels < 1:
            raise ConfigError("decode.max_pixels must be >= 1")
        if not self.max_aspect_ratio >= 1:
            raise ConfigError("decode.max_aspect_ratio must be >= 1")
        if not self.max_duration_s > 0 or not self.max_gap_s > 0:
            raise ConfigError("decode.max_duration_s and decode.max_gap_s must be > 0")

    @property
    def clip_seconds(self) -> float:
        return self.clip_frames / self.fps


@dataclass
class EncoderConfig:
    """The clip feature encoder (paper: S3D pretrained on Kinetics-400)."""

    name: str = "s3d"
    """Encoder architecture; only torchvision's S3D is implemented."""
    weights: str = "kinetics400"
    """`kinetics400` (torchvision download), `none` (random, on purpose), or a path/URI of a state dict."""
    seed: int = 0
    """Seed for random weights, so every actor builds the same encoder."""
    clips_per_batch: int = 16
    """Clips per forward pass in a feature actor."""
    dtype: str = "auto"
    """`auto` (bf16 on GPU, fp32 on CPU), `float32` or `bfloat16`."""

    deprecated_keys: ClassVar[dict[str, str]] = {"batch_size": "clips_per_batch"}
    """Old key -> its new name (`batch_size` also meant sequences and videos elsewhere)."""

    def __post_init__(self) -> None:
        if self.name != "s3d":
            raise ConfigError(f"encoder.name: unknown encoder {self.name!r} (known: s3d)")
        if self.clips_per_batch < 1:
            raise ConfigError("encoder.clips_per_batch must be >= 1")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError("encoder.dtype must be auto, float32 or bfloat16")


@dataclass
class ExtractConfig:
    """Parallelism of the extract stage on Ray Data."""

    decode_concurrency: int | None = None
    """Max concurrent decode tasks (None: as many as the free CPUs allow; on CPU-only nodes the
    feature actors leave room for one)."""
    cpus_per_decode_task: float = 0.5
    """CPUs a decode task reserves (decoding is light next to S3D on the CPU)."""
    decode_memory_mb: int = 2048
    """Memory a decode task declares to Ray's scheduler (the decode's bounds keep it under this)."""
    decode_max_retries: int = 2
    """Retries of a decode task whose worker died; then the video is an error row, not a hung run."""
    feature_actors: int | None = None
    """Feature actors (None: one per GPU, else one per node; see pipelines/ray_stages.py)."""
    cpus_per_feature_actor: float | None = None
    """CPUs each feature actor holds, and its torch threads (None: one with a GPU, else the
    node's CPUs less the decode tasks' share)."""
    retry_errors: bool = False
    """Decode again videos whose permanent error (not a video, over a bound) stands although their
    file did not change. Transient errors (storage, a killed worker) are retried on every run."""

    def __post_init__(self) -> None:
        if self.cpus_per_decode_task <= 0:
            raise ConfigError("extract.cpus_per_decode_task must be > 0")
        if self.decode_memory_mb < 64 or self.decode_max_retries < 0:
            raise ConfigError("extract.decode_memory_mb must be >= 64 and extract.decode_max_retries >= 0")
        for name in ("decode_concurrency", "feature_actors", "cpus_per_feature_actor"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"extract.{name} must be > 0, or null for the sizing rule")
        if self.manifest_flush_every < 1:
            raise ConfigError("extract.manifest_flush_every must be >= 1")

    manifest_flush_every: int = 32
    """Commit manifest rows after this many finished videos (bounds work lost to a kill)."""


@dataclass
class CodebookConfig:
    """Hierarchical k-means visual-word codebook (paper: depth 4, k 12 -> 20,736 words)."""

    k: int = 12
    """Clusters per level."""
    depth: int = 4
    """Levels in the tree."""
    sample_size: int = 1_000_000
    """Features sampled from features/ to fit the codebook."""
    iterations: int = 50
    """Max Lloyd iterations per node."""
    max_points_per_centroid: int | None = None
    """Train each node on at most this many points per centroid (faiss's default is 256);
    None trains on every point (best inertia). Every point is labelled either way."""
    init_trials: int | None = None
    """k-means++ candidates per seed: None is 2 + ln k (scikit-learn's greedy rule), 1 is
    classic k-means++ (faster, slightly higher inertia)."""
    seed: int = 0
    """Seed for sampling and k-means++ initialisation."""
    refit: bool = False
    """Refit even when a codebook exists (otherwise the newest one is reused)."""
    gallery_words: int = 16
    """Visual words shown in the gallery contact sheet."""

    def __post_init__(self) -> None:
        if self.k < 2 or self.depth < 1:
            raise ConfigError("codebook.k must be >= 2 and codebook.depth >= 1")
        for name in ("max_points_per_centroid", "init_trials"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"codebook.{name} must be >= 1, or null for the default")

    @property
    def vocab_size(self) -> int:
        return self.k**self.depth


@dataclass
class TextConfig:
    """The text WordPiece tokenizer (paper: BERT's 30k lower-cased WordPiece)."""

    vocab_size: int = 30_000
    """Vocabulary size when training WordPiece on the corpus transcripts."""
    vocab: str | None = None
    """An existing vocab.txt (e.g. BERT uncased) to load instead of training."""
    lowercase: bool = True
    """Lower-case text before tokenizing."""
    retrain: bool = False
    """Train a new tokenizer even when one trained with these settings exists (else reuse the newest)."""


@dataclass
class TokenizeConfig:
    """Alignment of visual words with narration sentences."""

    segment_tokens: int = 16
    """Video tokens per segment for videos without a transcript."""
    sentence_gap_s: float = 2.0
    """A pause between cues longer than this ends a sentence even without punctuation."""
    max_transcript_bytes: int = 8 * 1024 * 1024
    """A larger transcript file is not read: a transcript error, and video-only segments."""

    def __post_init__(self) -> None:
        if self.max_transcript_bytes < 1:
            raise ConfigError(f"tokenize.max_transcript_bytes must be >= 1, got {self.max_transcript_bytes}")


@dataclass
class ModelConfig:
    """The VideoBERT Transformer."""

    size: str = "large"
    """A named size from videobert.model_sizes.MODEL_SIZES: debug, base, large (paper)."""
    init_from: str | None = None
    """BERT checkpoint (path or Hugging Face name) for the Transformer and text embeddings."""
    max_seq_len: int = 512
    """Longest input sequence, in tokens."""
    video_input: str = "tokens"
    """What a video position takes in: `tokens` (visual-word embeddings, the paper), `features`
    (the clip's S3D feature through a projection, masked positions trained with InfoNCE against
    the batch's other masked clips: CBT, arXiv:1906.05743) or `both` (visual word + projected
    feature; cross-entropy and InfoNCE)."""

    # Shortest sequence worth building: [CLS], a few tokens of each modality, [SEP]s.
    min_seq_len: ClassVar[int] = 8

    def __post_init__(self) -> None:
        if self.video_input not in ("tokens", "features", "both"):
            raise ConfigError(
                f"model.video_input must be one of tokens, features, both, got {self.video_input!r}"
            )
        if self.size not in MODEL_SIZES:
            raise ConfigError(f"model.size: unknown size {self.size!r} (known: {', '.join(MODEL_SIZES)})")
        if self.max_seq_len < self.min_seq_len:
            raise ConfigError(f"model.max_seq_len must be >= {self.min_seq_len}, got {self.max_seq_len}")
        limit = MODEL_SIZES[self.size].max_positions
        if limit is not None and self.max_seq_len > limit:
            raise ConfigError(
                f"model.max_seq_len must be <= {limit} (the most positions of size {self.size!r}), "
                f"got {self.max_seq_len}"
            )


MISALIGNED_MASKING = ("input", "input_and_mlm", "none")


@dataclass
class ExamplesConfig:
    """How token rows become training examples: the paper's three regimes and augmentations."""

    mask_prob: float = 0.15
    """Share of non-special tokens chosen for MLM (80% [MASK], 10% random, 10% kept)."""
    max_subsample: int = 5
    """Video tokens are subsampled at a rate drawn from 1..max_subsample."""
    concat_prob: float = 0.5
    """Chance that a segment is concatenated with following neighbouring segments."""
    max_concat: int = 3
    """Most segments concatenated into one example."""
    misaligned_fraction: float = 0.5
    """Share of text+video examples whose video comes from elsewhere."""
    regime_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    """Relative shares of the text-only, video-only and text+video regimes in every batch."""
    misaligned_masking: str = "input"
    """How misaligned text+video pairs are masked. `input` (default): their input is masked
    like an aligned pair's, but their masked tokens are not MLM targets (a word predicted next
    to the wrong video teaches that the video does not matter). `input_and_mlm`: masked, and
    the MLM loss kept. `none`: left unmasked, which lets the alignment head tell the pairs apart
    by "has a [MASK]" alone and fail on unmasked held-out pairs (README, issue 13 results)."""

    def __post_init__(self) -> None:
        if not 0 < self.mask_prob < 1:
            raise ConfigError("examples.mask_prob must be in (0, 1)")
        if self.max_subsample < 1 or self.max_concat < 1:
            raise ConfigError("examples.max_subsample and examples.max_concat must be >= 1")
        if not 0 <= self.concat_prob <= 1 or not 0 <= self.misaligned_fraction <= 1:
            raise ConfigError("examples.concat_prob and examples.misaligned_fraction must be in [0, 1]")
        if self.misaligned_masking not in MISALIGNED_MASKING:
            raise ConfigError(
                f"examples.misaligned_masking must be one of {', '.join(MISALIGNED_MASKING)}, "
                f"got {self.misaligned_masking!r}"
            )
        weights = self.regime_weights
        if len(weights) != 3 or min(weights) < 0 or not any(weights):
            raise ConfigError(
                "examples.regime_weights must be 3 non-negative shares (text, video, text+video), not all 0"
            )


@dataclass
class TrainConfig:
    """Distributed pretraining with Ray Train + DeepSpeed."""

    steps: int = 100_000
    """Optimizer steps."""
    workers: int = 1
    """Ray Train workers."""
    use_gpu: bool = False
    """One GPU per worker (NCCL) instead of CPU workers (gloo)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 1, 2 or 3."""
    batch_size: int = 128
    """Global batch size in sequences, across workers and accumulation steps."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    lr: float = 1e-5
    """Peak learning rate (paper: 1e-5 when initialised from BERT)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warmup steps, then linear decay to zero."""
    grad_clip: float = 1.0
    """Gradient norm clipping."""
    precision: str = "bf16"
    """`bf16` or `fp32`."""
    checkpoint_every: int = 1000
    """Steps between checkpoints."""
    log_every: int = 10
    """Steps between logged metrics."""
    seed: int = 0
    """Seed for example building and initialisation."""
    storage_path: str | None = None
    """Ray Train storage (local or s3://); default `<output>/train`."""
    run_name: str | None = None
    """Ray Train run name; rerunning the same name resumes."""
    max_failures: int = 2
    """Worker failures tolerated before the run fails."""
    worker_resource: str | None = None
    """A custom Ray resource each worker also holds one unit of: a node started with
    `--resources='{"<name>": 1}'` then takes one worker, so 2 workers land on 2 such nodes."""
    resume_from_champion: bool = False
    """Start a new run from the registered champion's weights instead of from scratch (when
    there is a champion). Text rows follow their tokens; visual rows need the same codebook."""
    cache_shard_rows: int = 100_000
    """A worker whose token shard has at most this many rows keeps it in memory after the first
    epoch instead of streaming it again (0: always stream)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("train.zero_stage must be 0, 1, 2 or 3")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError("train.precision must be bf16 or fp32")
        if self.workers < 1 or self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.workers, steps, batch_size and grad_accum must be >= 1")
        if self.batch_size % (self.workers * self.grad_accum):
            raise ConfigError("train.batch_size must be divisible by train.workers * train.grad_accum")


@dataclass
class MlflowConfig:
    """MLflow tracking and registry."""

    tracking_uri: str | None = None
    """Tracking store; default MLFLOW_TRACKING_URI, else SQLite under `output`."""
    experiment: str = "videobert"
    """Experiment name."""
    registered_model: str = "videobert"
    """Registered model name; evaluate and embed default to its @candidate and @champion."""

    def __post_init__(self) -> None:
        if not self.registered_model:
            raise ConfigError("mlflow.registered_model must be set")


@dataclass
class EvaluateConfig:
    """Evaluation and promotion."""

    model_uri: str | None = None
    """The model to evaluate, as models:/<name>@<alias>; None: models:/<mlflow.registered_model>@candidate."""
    labels: str | None = None
    """CSV or Parquet with source_uri, verb, object for zero-shot classification."""
    zero_shot_prefix: str | None = None
    """The words of the zero-shot template before "[MASK] the [MASK]". None: the words the
    corpus's own training narrations most often say before a labelled "<verb> the <object>"
    (`evaluation.narration_prefix`), else the paper's "now let me show you how to"."""
    holdout_fraction: float = 0.1
    """Share of videos held out of training for evaluation (by video_id hash)."""
    metric: str = "videobert_score"
    """Metric that decides promotion (higher is better): any metric evaluate records, or the
    combined metric below."""
    combined_metric: str = "videobert_score"
    """Name of the combined metric evaluate records: the weighted mean of `combined_weights`."""
    combined_weights: dict[str, float] = field(
        default_factory=lambda: {
            "zero_shot_object_top1": 1.0,
            "zero_shot_verb_top1": 1.0,
            "alignment_auc": 1.0,
            "retrieval_recall_at_1": 1.0,
        }
    )
    """metric -> weight. The default weighs what is shown (objects), what is done (verbs) and
    which narration goes with which footage (alignment, retrieval) alike, so a model that only
    names objects cannot take the champion alias from one that also aligns."""

    def __post_init__(self) -> None:
        weights = self.combined_weights
        if not weights or min(weights.values()) < 0 or not any(weights.values()):
            raise ConfigError("evaluate.combined_weights must map metrics to non-negative weights, not all 0")
        if self.model_uri is None:
            return
        # Evaluation tags the version the alias points to now, and promotion moves aliases.
        if _parse_uri_of("evaluate.model_uri", self.model_uri).alias is None:
            raise ConfigError(
                f"evaluate.model_uri must name an alias, models:/<name>@<alias>, got {self.model_uri!r}"
            )


@dataclass
class EmbedConfig:
    """Batch inference (`videobert embed`): videos -> embeddings with a registered model.

    Decode and feature extraction reuse the `decode`, `encoder` and `extract` sections.
    """

    model_uri: str | None = None
    """models:/<name>@<alias> or models:/<name>/<version> (resolved to a version first);
    None: models:/<mlflow.registered_model>@champion."""
    output: str = ""
    """Root of the embeddings (s3:// or local); empty: `<output>/embeddings`. One folder per model version."""
    videos_per_batch: int = 16
    """Videos per batch in an embedding actor (their chunks run as one padded forward pass)."""
    actors: int | None = None
    """Embedding actors (None: one per GPU, else one per node; see pipelines/ray_stages.py)."""
    reuse_features: bool = True
    """Use extract's committed features of a video (same ETag and encoder) instead of decoding it again."""
    retry_errors: bool = False
    """Retry videos whose permanent error stands although their file did not change (a changed
    file, and a transient error, are always retried)."""

    deprecated_keys: ClassVar[dict[str, str]] = {"batch_size": "videos_per_batch"}
    """Old key -> its new name (`batch_size` also meant sequences and clips elsewhere)."""

    def __post_init__(self) -> None:
        if self.model_uri is not None:
            _parse_uri_of("embed.model_uri", self.model_uri)
        if self.videos_per_batch < 1:
            raise ConfigError("embed.videos_per_batch must be >= 1")
        if self.actors is not None and self.actors < 1:
            raise ConfigError("embed.actors must be >= 1 (or null: one per GPU)")


FINETUNE_MODES = ("linear_probe", "full")


@dataclass
class CaptionerConfig:
    """The captioner of `videobert finetune-caption` (the paper's §4.6, after Zhou et al. 2018):
    a transformer encoder-decoder over pooled segment features, with the paper's settings."""

    layers: int = 2
    """Encoder and decoder layers each."""
    hidden: int = 128
    """Hidden size."""
    heads: int = 8
    """Attention heads."""
    dropout: float = 0.4
    lr: float = 1e-3
    """Adam learning rate."""
    batch_size: int = 128
    """Captioned segments per step (all of them when there are fewer)."""
    steps: int = 1000
    """Optimizer steps of each captioner (VideoBERT + S3D and the two baselines)."""
    max_caption_words: int = 20
    """Words per caption, in training (longer ones are cut) and in decoding."""
    min_word_count: int = 1
    """A training-caption word seen fewer times is <unk>."""
    beam_size: int = 3
    """Beam width of decoding (1: greedy)."""
    freeze_pretrained: bool = True
    """True: the pretrained VideoBERT stays as registered and the captioners train on fixed
    features; false: it trains too (`encoder_lr`), inside the VideoBERT captioners' graphs."""
    encoder_lr: float = 1e-5
    """Learning rate of the pretrained VideoBERT when `freeze_pretrained` is false."""
    template: str = "now let's [MASK] the [MASK] to the [MASK], and then [MASK] the [MASK]"
    """The text the segment's video tokens follow; the mean of its [MASK] outputs is a feature."""

    def __post_init__(self) -> None:
        if min(self.layers, self.hidden, self.heads, self.batch_size, self.steps) < 1:
            raise ConfigError("finetune.captioner: layers, hidden, heads, batch_size and steps must be >= 1")
        if self.hidden % self.heads:
            raise ConfigError(
                f"finetune.captioner.hidden ({self.hidden}) must be a multiple of heads ({self.heads})"
            )
        if not 0 <= self.dropout < 1 or not self.lr > 0 or not self.encoder_lr > 0:
            raise ConfigError("finetune.captioner: dropout must be in [0, 1), lr and encoder_lr > 0")
        if self.max_caption_words < 1 or self.beam_size < 1 or self.min_word_count < 1:
            raise ConfigError(
                "finetune.captioner: max_caption_words, beam_size and min_word_count must be >= 1"
            )
        if "[MASK]" not in self.template:
            raise ConfigError("finetune.captioner.template needs at least one [MASK]")


@dataclass
class FinetuneConfig:
    """Classification fine-tuning (`videobert finetune-classify`): a pretrained model, a labelled
    table of videos, and a linear head on the model's pooled video embedding
    (`pooled_features`) and the zero-shot template's [MASK] outputs (`template_features`)."""

    labels: str | None = None
    """CSV or Parquet: source_uri, label, optional start_s / end_s (a window), split (train or
    test), verb and object; None: no classifier (`videobert run` skips the stage)."""
    mode: str = "linear_probe"
    """`linear_probe`: the pretrained encoder frozen, only the head trains; `full`: both train."""
    template_features: bool = True
    """Also feed the head the mean of the zero-shot template's [MASK] outputs with the clip
    ("now let me show you how to [MASK] the [MASK]" [>] video), the paper's downstream features
    (§4.6): what the pretrained model would say is done and shown. False: the pooled video
    embedding alone (`videobert embed`'s)."""
    pooled_features: bool = True
    """Feed the head the pooled video embedding (`[CLS] video [SEP]`, `videobert embed`'s). False,
    with `template_features`: the template's [MASK] outputs alone (on the demo as good as zero-shot
    on three champions of four, and under it on the fourth: README)."""
    zero_shot_weight: float = 0.0
    """The classifier's scores blend the head's log-probabilities with zero-shot's (the same
    template's class scores), weighted (1 - w) and w, in training's test scores and in
    `predict` (an output-space ensemble with the zero-shot model, as WiSE-FT's): 0, the head
    alone; 1, zero-shot alone. `head_top1` reports the head alone. Only for a table whose `verb`
    and `object` columns name one pair per class (`classification.blend_weight`)."""
    model_uri: str | None = None
    """The pretrained model, models:/<name>@<alias> or /<version> (resolved to one version first);
    None: models:/<mlflow.registered_model>@champion."""
    classifier_name: str = "videobert-classifier"
    """Registered model name of the classifiers (`candidate` on each version, `champion` on the best)."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 32
    """Labelled clips per step (all of them when there are fewer)."""
    lr: float = 1e-2
    """Learning rate of the head (new weights: a high rate)."""
    encoder_lr: float = 1e-4
    """Learning rate of the pretrained encoder in `full` mode (pretrained weights: a low rate)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    test_fraction: float = 0.2
    """Without a `split` column: the share of videos held out for test, by video hash."""
    log_every: int = 10
    """Steps between logged training metrics."""
    seed: int = 0
    """Seed of the head's initialisation and of the batches (and of the captioners')."""
    captions: str | None = None
    """CSV or Parquet: source_uri, start_s, end_s, caption, optional split (train or test) and
    object (scored: does the generated caption name it); None: no captioner (`videobert run`
    skips `finetune-caption`)."""
    captioner_name: str = "videobert-captioner"
    """Registered model name of the captioners (`candidate` on each version, `champion` on the best)."""
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)

    def __post_init__(self) -> None:
        if not self.captioner_name:
            raise ConfigError("finetune.captioner_name must be set")
        if self.mode not in FINETUNE_MODES:
            raise ConfigError(f"finetune.mode must be one of {', '.join(FINETUNE_MODES)}, got {self.mode!r}")
        if self.model_uri is not None:
            _parse_uri_of("finetune.model_uri", self.model_uri)
        if not self.classifier_name:
            raise ConfigError("finetune.classifier_name must be set")
        if self.steps < 1 or self.batch_size < 1 or self.log_every < 1:
            raise ConfigError("finetune.steps, finetune.batch_size and finetune.log_every must be >= 1")
        if not self.lr > 0 or not self.encoder_lr > 0 or self.weight_decay < 0:
            raise ConfigError("finetune.lr and finetune.encoder_lr must be > 0, finetune.weight_decay >= 0")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"finetune.test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0 <= self.zero_shot_weight <= 1:
            raise ConfigError(f"finetune.zero_shot_weight must be in [0, 1], got {self.zero_shot_weight}")
        if self.zero_shot_weight and self.mode == "full":
            # zero-shot is the pretrained model's; a `full` version carries only its fine-tuned encoder
            raise ConfigError(
                "finetune.zero_shot_weight needs finetune.mode linear_probe (zero-shot is the pretrained "
                "encoder's); set finetune.zero_shot_weight=0 to fine-tune fully"
            )
        if not (self.pooled_features or self.template_features):
            raise ConfigError("finetune.pooled_features and finetune.template_features cannot both be false")


@dataclass
class DemoConfig:
    """The generated demo corpus (`videobert demo-corpus`): which classes, how many videos."""

    objects: int = 4
    """Objects used, the first N of videobert.demo_corpus.OBJECTS."""
    actions: int = 3
    """Actions used, the first N of videobert.demo_corpus.ACTIONS."""
    videos_per_class: int = 5
    """Videos per (object, action) pair."""
    seed: int = 0
    """Seed for every per-video variation (background, position, speed, fillers)."""
    show_videos: int = 4
    """`videobert show` (the end of ./scripts/demo.sh): held-out videos whose predicted label
    and generated caption are printed next to the truth."""

    # len(OBJECTS) and len(ACTIONS) of videobert.demo_corpus, copied because that module needs
    # av and PIL and the config must load without them; tests/test_demo_corpus.py pins them.
    available_objects: ClassVar[int] = 6
    available_actions: ClassVar[int] = 5

    def __post_init__(self) -> None:
        if not 1 <= self.objects <= self.available_objects:
            raise ConfigError(f"demo.objects must be in 1..{self.available_objects}, got {self.objects}")
        if not 1 <= self.actions <= self.available_actions:
            raise ConfigError(f"demo.actions must be in 1..{self.available_actions}, got {self.actions}")
        if self.videos_per_class < 1:
            raise ConfigError(f"demo.videos_per_class must be >= 1, got {self.videos_per_class}")
        if self.show_videos < 0:
            raise ConfigError(f"demo.show_videos must be >= 0, got {self.show_videos}")


@dataclass
class LeaseConfig:
    """The lease on `output` that keeps two runs from writing there at once (videobert/lease.py)."""

    ttl_s: float = 300.0
    """A lease not renewed for this long is free: its holder died. Renewed every ttl_s / 3."""
    wait_s: float = 0.0
    """How long a stage waits for another run's lease before it gives up (exit code 5)."""
    poll_s: float = 5.0
    """How often a waiting stage tries again."""

    def __post_init__(self) -> None:
        if self.ttl_s < 3 or self.wait_s < 0 or self.poll_s <= 0:
            raise ConfigError(
                f"lease needs ttl_s >= 3, wait_s >= 0 and poll_s > 0, got "
                f"ttl_s={self.ttl_s}, wait_s={self.wait_s}, poll_s={self.poll_s}"
            )


@dataclass
class ExperimentConfig:
    """A whole experiment: where data comes from and goes, and every stage's settings."""

    source: str = "data/videos"
    """Where the videos are: s3://bucket/prefix or a local directory."""
    output: str = "out"
    """Root of every table: s3://bucket/prefix or a local directory."""
    name: str = "videobert"
    """Experiment name, used for run names."""
    s3: S3Config = field(default_factory=S3Config)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    examples: ExamplesConfig = field(default_factory=ExamplesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)

    def __post_init__(self) -> None:
        # Every string field, by any name (source, output, s3.endpoint_url, tracking URI,
        # labels, ...): a URI with credentials is refused before anything can record it.
        _check_strings(self, "")
        if not self.source:
            raise ConfigError("source must be set (s3://bucket/prefix or a local path)")
        if not self.output:
            raise ConfigError("output must be set (s3://bucket/prefix or a local path)")
        # Unset model URIs follow the registered model's name, so renaming it in one place
        # moves pretrain, evaluate, promote and embed together.
        registered = self.mlflow.registered_model
        if self.evaluate.model_uri is None:
            self.evaluate.model_uri = f"models:/{registered}@candidate"
        if self.embed.model_uri is None:
            self.embed.model_uri = f"models:/{registered}@champion"
        if self.finetune.model_uri is None:
            self.finetune.model_uri = f"models:/{registered}@champion"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert a YAML value to the field's annotated type, or raise naming `key`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(annotation, value, key + ".")
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {
            _coerce(k, key_type, f"{key} key"): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()
        }
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            check_uri(key, str(value))  # before any section check could echo the value
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {annotation!r}")


def _parse_uri_of(key: str, model_uri: str) -> ModelRef:
    """parse_model_uri, with the config key in the error."""
    try:
        return parse_model_uri(model_uri)
    except ConfigError as error:
        raise ConfigError(f"{key}: {error}") from None


def _rename_deprecated_keys(cls: type, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Move values given under a section's old key names (its `deprecated_keys`) to the new names."""
    renamed: dict[str, str] = getattr(cls, "deprecated_keys", {})
    values = dict(values)
    for old, new in renamed.items():
        if old not in values:
            continue
        if new in values:
            raise ConfigError(
                f"{prefix}{old} and {prefix}{new} are both set; {prefix}{old} is the deprecated name "
                f"of {prefix}{new}: keep only {prefix}{new}"
            )
        warnings.warn(
            f"config key {prefix}{old} is deprecated: use {prefix}{new}",
            DeprecatedConfigKeyWarning,
            stacklevel=2,
        )
        values[new] = values.pop(old)
    return values


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    values = _rename_deprecated_keys(cls, values, prefix)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (known in this section: {', '.join(sorted(known))})"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as error:
        raise ConfigError(f"{prefix or 'config'}: {error}") from error


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML, so numbers, bools and null work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Load a YAML config (safe_load), apply `key=value` overrides, and validate.

    Also refuses credentials in the URIs of the environment (`check_environment`).
    """
    check_environment()
    values: dict[str, Any] = {}
    if path is not None:
        config_path = Path(path)
        if not config_path.is_file():
            raise ConfigError(f"config file not found: {config_path}")
        try:
            loaded = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{config_path}: not valid YAML: {error}") from error
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{config_path}: the top level must be a mapping")
        values = loaded or {}
    for override in overrides or []:
        key, value = parse_override(override)
        _set_dotted(values, key, value)
    return _build(ExperimentConfig, values)


def config_to_yaml(config: ExperimentConfig) -> str:
    """The whole config as YAML (the registered model's experiment.yaml), redacted."""
    return redact(yaml.safe_dump(config.to_dict(), sort_keys=False))


def flat_params(config: ExperimentConfig) -> dict[str, Any]:
    """Dotted key -> value, for MLflow params; strings redacted (a loaded config holds no
    credentials; a config changed in code after load still must not leak any)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = redact(node) if isinstance(node, str) else node

    walk(config.to_dict(), "")
    return flat
