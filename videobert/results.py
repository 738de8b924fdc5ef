"""What each stage makes, as typed results, and the one rule by which a stage finds its inputs.

`videobert run` hands each stage's result to the next one. A stage run alone finds the same
inputs with the same rule (`find_codebook`, `find_tokenizer`, `find_tokens`): the codebook
with the configured k and depth, the tokenizer that the `text` section selects, and the token
shards made from those two. So pretrain trains on exactly what tokenize produced for this
config, whether or not it runs under `run`.

Naming: `stage_run_id` names one run of a data stage; `pretrain_run_name` names a training run
after what it trains on, so a rerun on the same inputs continues the same run.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, field

from videobert import storage, tables, versions
from videobert.config import ExperimentConfig
from videobert.storage import ObjectInfo


class MissingInputError(RuntimeError):
    """An upstream stage's output is missing: the message names the stage to run first."""


def stage_run_id(stage: str) -> str:
    """A unique, sortable id for one run of a data stage: `<stage>-<UTC time>-<random>`."""
    return f"{stage}-{tables.now_utc().strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


# ---- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodebookResult:
    """A codebook under `codebook/<version>/`, fitted now or reused."""

    uri: str
    version: str
    vocab_size: int
    """Visual words (k ** depth)."""
    reused: bool = True
    sample_size: int = 0
    inertia_per_level: tuple[float, ...] = ()
    mlflow_run_id: str = ""


@dataclass(frozen=True)
class TokenizerResult:
    """A saved WordPiece tokenizer under `text/<version>/`."""

    uri: str
    version: str


@dataclass
class TokenizeResult:
    """The token shards of one (codebook, tokenizer) pair, and what this run changed."""

    tokens_uri: str
    codebook: CodebookResult
    tokenizer: TokenizerResult
    files: list[ObjectInfo] = field(default_factory=list)
    """The shards' files (name, size, ETag): what pretrain reads and digests."""
    videos_done_before: int = 0
    videos_changed: int = 0
    videos_removed: int = 0
    videos_tokenized: int = 0
    segments: int = 0
    transcript_errors: int = 0
    errors: int = 0

    @property
    def digest(self) -> str:
        return token_digest(self.files)


@dataclass
class PretrainResult:
    """One pretraining run and the model version it registered (or found already trained)."""

    model_name: str
    model_version: str
    run_id: str = ""
    run_name: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    start_step: int = 0
    """Step the last training attempt started from (0 = from scratch)."""
    checkpoint: str = ""
    skipped: bool = False
    """True when the candidate was already trained on these tokens and settings."""

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}/{self.model_version}"


@dataclass
class EvaluationResult:
    """The metrics of one evaluated model version (also tags `eval.<metric>` on the version)."""

    model_name: str
    version: str
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: bool = False
    """True when the version already had an evaluation."""
    unreadable: dict[str, str] = field(default_factory=dict)
    """source_uri -> why, for each labelled video that could not be scored."""


@dataclass
class FinetuneResult:
    """One classifier version (`videobert finetune-classify`), or the one found already trained."""

    classifier_name: str
    version: str
    pretrained_uri: str
    """The pinned pretrained version it was built on, models:/<name>/<version>."""
    run_id: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    promoted: bool = False
    """True when the version is (now) the classifiers' champion."""
    skipped: bool = False
    """True when the candidate was already trained on this pretrained version, table and settings."""
    unreadable: dict[str, str] = field(default_factory=dict)
    """video (or window) -> why, for each labelled clip that could not be used."""

    @property
    def model_uri(self) -> str:
        return f"models:/{self.classifier_name}/{self.version}"


# ---- video stages ----------------------------------------------------------------------------


@dataclass
class VideoStageSummary:
    """What one run of a video stage (extract, embed) did."""

    stage: str
    run_id: str = ""
    listed: int = 0
    ok: int = 0
    error: int = 0
    skipped: int = 0
    clips: int = 0
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)
    """source_uri -> "<stage>: <reason>" for every video that ended in error."""

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0

    def headline(self) -> str:
        return (
            f"{self.stage} {self.run_id}: {self.listed} videos listed: {self.ok} ok, {self.error} error, "
            f"{self.skipped} skipped (up to date)"
        )

    def details(self) -> list[str]:
        """Stage-specific lines under the headline (outputs, extra counts)."""
        return []

    def report(self) -> str:
        lines = [
            self.headline(),
            f"  {self.clips} clips in {self.seconds:.1f} s ({self.clips_per_s:.1f} clips/s)",
            *self.details(),
        ]
        lines += [f"  error: {uri}: {reason}" for uri, reason in sorted(self.errors.items())]
        return "\n".join(lines)


@dataclass
class ExtractResult(VideoStageSummary):
    """What one extract run did, and where its tables are."""

    stage: str = "extract"
    relinked: int = 0
    """Extracted videos whose transcript sidecar appeared, vanished or changed name."""
    encoder: str = ""
    features: str = ""
    manifest: str = ""

    def details(self) -> list[str]:
        lines = [f"  features: {self.features}", f"  manifest: {self.manifest}"]
        if self.relinked:
            lines.insert(0, f"  relinked: {self.relinked} with a new transcript sidecar")
        return lines


@dataclass
class EmbedResult(VideoStageSummary):
    """What one embed run did, with which model version, and where its tables are."""

    stage: str = "embed"
    reused: int = 0
    """Videos embedded from extract's committed features instead of being decoded again."""
    model_uri: str = ""
    """The resolved version, models:/<name>/<version>."""
    requested_uri: str = ""
    model_version: str = ""
    directory: str = ""

    def details(self) -> list[str]:
        layout = tables.EmbeddingLayout(self.directory)
        return [
            f"  model: {self.model_uri} (from {self.requested_uri})",
            f"  extract's features reused for {self.reused} videos",
            f"  embeddings: {layout.data}",
            f"  manifest: {layout.manifest}",
        ]


# ---- digests and names -----------------------------------------------------------------------


def token_digest(files: list[ObjectInfo]) -> str:
    """Content digest of the token shards from their names, sizes and ETags (no data read)."""
    digest = hashlib.sha256()
    for info in sorted(files, key=lambda f: f.uri):
        digest.update(f"{info.uri.rsplit('/', 1)[-1]}\t{info.size}\t{info.etag}\n".encode())
    return digest.hexdigest()[:20]


def train_digest(config: ExperimentConfig) -> str:
    """What makes two pretraining runs the same run: the model, examples and training settings."""
    settings = {
        "model": asdict(config.model),
        "examples": asdict(config.examples),
        "train": asdict(config.train),
        # Which videos are held out: the fraction, and since the split hashes each video's path
        # under `source` (not its whole URI), a marker that keeps older runs apart.
        "holdout": [config.evaluate.holdout_fraction, "path-under-source"],
    }
    settings["train"].pop("run_name", None)
    if settings["model"].get("video_input") == "tokens":  # the default: digests from before it stay
        settings["model"].pop("video_input")
    settings["train"].pop("worker_resource", None)  # where workers run, not what they train
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def pretrain_run_name(config: ExperimentConfig, tokens: TokenizeResult, init_model_uri: str | None) -> str:
    """`train.run_name`, else `<name>-<tokens digest>-<train digest>[-from-v<N>]`: the same
    inputs, settings and starting point give the same name, so a killed run resumes."""
    if config.train.run_name:
        return config.train.run_name
    start = f"-from-v{init_model_uri.rsplit('/', 1)[1]}" if init_model_uri else ""
    return f"{config.name}-{tokens.digest}-{train_digest(config)}{start}"


# ---- finding a stage's inputs ------------------------------------------------------------------


def find_codebook(config: ExperimentConfig) -> CodebookResult | None:
    """The newest complete codebook with the configured k and depth, or None."""
    from videobert.codebook import list_codebooks

    meta = versions.newest(
        list_codebooks(config.output, config.s3), k=config.codebook.k, depth=config.codebook.depth
    )
    if meta is None:
        return None
    return CodebookResult(uri=meta["uri"], version=meta["version"], vocab_size=int(meta["vocab_size"]))


def require_codebook(config: ExperimentConfig) -> CodebookResult:
    codebook = find_codebook(config)
    if codebook is None:
        raise MissingInputError(
            f"no codebook with k={config.codebook.k} depth={config.codebook.depth} under "
            f"{tables.Layout(config.output).codebooks}: run `videobert fit-codebook` first"
        )
    return codebook


def find_tokenizer(config: ExperimentConfig) -> TokenizerResult | None:
    """The tokenizer the `text` section selects, if it is saved: the one built from `text.vocab`,
    else the newest one trained with this vocab_size and lower-casing."""
    from videobert.text_tokenizer import TextTokenizer, list_tokenizers

    text, s3 = config.text, config.s3
    if text.vocab:
        version = TextTokenizer.from_vocab_file(text.vocab, text.lowercase, s3).version
        uri = tables.Layout(config.output).tokenizer(version)
        saved = storage.exists(storage.join(uri, "meta.json"), s3)
        return TokenizerResult(uri, version) if saved else None
    meta = versions.newest(
        list_tokenizers(config.output, s3),
        source="trained",
        lowercase=text.lowercase,
        requested_vocab_size=text.vocab_size,
    )
    return None if meta is None else TokenizerResult(meta["uri"], meta["version"])


def token_files(tokens_uri: str, config: ExperimentConfig) -> list[ObjectInfo]:
    """The shards under one token directory (none when it does not exist yet)."""
    if not storage.exists(tokens_uri, config.s3):
        return []
    return storage.list_objects(tokens_uri, config.s3, ["parquet"])


def find_tokens(config: ExperimentConfig) -> TokenizeResult:
    """The token shards that tokenize made for this config (see the module doc)."""
    codebook = require_codebook(config)
    tokenizer = find_tokenizer(config)
    if tokenizer is None:
        raise MissingInputError(
            f"no tokenizer for text.vocab={config.text.vocab} text.vocab_size={config.text.vocab_size} "
            f"text.lowercase={config.text.lowercase} under {tables.Layout(config.output).text}: "
            "run `videobert tokenize` first"
        )
    tokens_uri = tables.Layout(config.output).tokens(codebook.version, tokenizer.version)
    files = token_files(tokens_uri, config)
    if not files:
        raise MissingInputError(f"no token shards under {tokens_uri}: run `videobert tokenize` first")
    return TokenizeResult(tokens_uri, codebook, tokenizer, files)
