"""Captioning fine-tuning (Ray-free; the paper's §4.6): a captions table of video segments ->
pooled segment features -> a transformer encoder-decoder captioner, scored on held-out segments.

- **The table** (`read_captions_table`, `finetune.captions`): CSV or Parquet with `source_uri`,
  `start_s`, `end_s` and `caption`; optionally `split` (`train` / `test`; without it, the
  classification table's hold-out by video hash) and `object` (the word a good caption names:
  the share of generated captions that do is reported). The reader, the split and the checks
  are the classification table's (`classification.read_finetune_table`).
- **Features, as in the paper** (`segment_parts`): the segment's visual words follow the
  template "now let's [MASK] the [MASK] to the [MASK], and then [MASK] the [MASK]"
  (`finetune.captioner.template`) as `[CLS] template [>] video [SEP]` through the pretrained
  model; the VideoBERT features are the mean of the video tokens' last hidden states and the
  mean of the [MASK] positions' ones. "VideoBERT + S3D" adds the mean of the segment's S3D clip
  features (as extract stores them: float16). The S3D-only baseline has that mean alone.
  `FEATURE_SETS` names the three; each trains its own captioner, side by side.
- **The captioner** (`CaptionModel`, after Zhou et al. 2018): each feature part is standardised
  (the training features' mean and deviation, fixed), projected to `hidden` and becomes one
  encoder token (with a learnt part embedding): the parts are concatenated as a sequence, not
  a single vector, so no part's scale drowns another's. A transformer encoder and decoder
  (`layers` each, `heads`, `dropout`) predict the caption's words; Adam, cross-entropy.
- **Decoding**: `greedy_decode` and `beam_decode` (mean log-probability per token ranks the
  finished beams; a beam of 1 is greedy).
- **Caption words** (`CaptionVocab`): the training captions, lower-cased and split into words;
  `<pad>`, `<bos>`, `<eos>`, `<unk>` first. Saved as JSON beside the captioner.
- **Metrics** (`score_captions`): BLEU-3, BLEU-4, METEOR, ROUGE-L and CIDEr, micro-averaged
  over the test segments by `pycocoevalcap` (its PTB tokenizer and METEOR run Java). Without a
  `java` on PATH one warning says so, captions are tokenised in Python, and METEOR is reported
  missing.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from videobert.classification import VideoWindow, _text, read_finetune_table
from videobert.config import ExperimentConfig, FinetuneConfig, S3Config
from videobert.dropout import use_fast_dropout

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("source_uri", "start_s", "end_s", "caption")
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "s3d": ("s3d",),
    "videobert": ("video", "text"),
    "videobert_s3d": ("video", "text", "s3d"),
}
"""Each captioner's input parts: `video` (mean of the video tokens' outputs), `text` (mean of
the template's [MASK] outputs), `s3d` (mean S3D clip feature)."""
LABELS = {"s3d": "S3D", "videobert": "VideoBERT", "videobert_s3d": "VideoBERT + S3D"}
REGISTERED = "videobert_s3d"
"""The feature set of the registered captioner (the paper's best)."""
METRIC_NAMES = ("bleu3", "bleu4", "meteor", "rouge_l", "cider")
METRIC = "test_cider"
"""What the captioners' `champion` alias is moved on (higher wins)."""


# ---- the captions table ------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionedSegment(VideoWindow):
    """One row of the captions table: a window of a video, its caption and its split."""

    row: int
    source_uri: str
    caption: str
    split: str
    start_s: float | None = None
    end_s: float | None = None
    object: str | None = None


def read_captions_table(uri: str, config: ExperimentConfig) -> list[CaptionedSegment]:
    """Every row of `finetune.captions` (module doc), checked; ConfigError names the column and row."""
    rows, columns = read_finetune_table(uri, config, "finetune.captions", REQUIRED_COLUMNS, ["caption"])
    has_object = "object" in columns
    return [
        CaptionedSegment(
            r.row,
            r.source_uri,
            str(_text(r.values["caption"])),
            r.split,
            r.start_s,
            r.end_s,
            _text(r.values["object"]) if has_object else None,
        )
        for r in rows
    ]


def caption_digest(settings: FinetuneConfig) -> str:
    """The settings that make two captioners the same (the table, the pretrained version and the
    registered name are told apart by their own tags)."""
    values = {"captioner": asdict(settings.captioner), "seed": settings.seed}
    values["test_fraction"] = settings.test_fraction
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


# ---- caption words -----------------------------------------------------------------------------

PAD, BOS, EOS, UNK = range(4)
SPECIAL_WORDS = ("<pad>", "<bos>", "<eos>", "<unk>")
_WORD = re.compile(r"[a-z0-9]+|'[a-z]+")


def caption_words(text: str) -> list[str]:
    """Lower-cased words, punctuation dropped, "let's" -> "let", "'s" (as the PTB tokenizer does)."""
    return _WORD.findall(text.lower())


@dataclass
class CaptionVocab:
    """The captioner's words: SPECIAL_WORDS, then the training captions' words, by count."""

    words: list[str]

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, captions: Sequence[str], min_count: int = 1) -> CaptionVocab:
        counts = Counter(w for c in captions for w in caption_words(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls([*SPECIAL_WORDS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, caption: str, max_words: int) -> list[int]:
        """<bos> words (at most `max_words`) <eos>."""
        ids = [self.index.get(w, UNK) for w in caption_words(caption)[:max_words]]
        return [BOS, *ids, EOS]

    def decode(self, ids: Sequence[int]) -> str:
        """Words up to the first <eos> or <pad>; <bos> and <unk> left out."""
        words = []
        for i in ids:
            if i in (EOS, PAD):
                break
            if i not in (BOS, UNK):
                words.append(self.words[i])
        return " ".join(words)

    def to_json(self) -> str:
        return json.dumps({"words": self.words}, indent=0)

    @classmethod
    def from_json(cls, text: str) -> CaptionVocab:
        return cls(list(json.loads(text)["words"]))


def caption_tensor(vocab: CaptionVocab, captions: Sequence[str], max_words: int) -> torch.Tensor:
    """[N, max_words + 2] <bos> ... <eos> ids, padded with <pad>."""
    out = torch.full((len(captions), max_words + 2), PAD, dtype=torch.long)
    for i, caption in enumerate(captions):
        ids = vocab.encode(caption, max_words)
        out[i, : len(ids)] = torch.as_tensor(ids)
    return out


# ---- segment features ------------------------------------------------------------------------


def template_ids(
    template: str, encode: Callable[[str], list[int]], vocab: Any
) -> tuple[np.ndarray, list[int]]:
    """The template's joint text ids with [MASK] at each "[MASK]", and the masks' positions."""
    from videobert.model import MASK

    ids: list[int] = []
    masks = []
    pieces = template.split("[MASK]")
    for n, piece in enumerate(pieces):
        if piece.strip():
            ids += [int(i) for i in vocab.text_ids(np.asarray(encode(piece), np.int64))]
        if n < len(pieces) - 1:
            masks.append(len(ids))
            ids.append(MASK)
    return np.asarray(ids, np.int64), masks


def segment_parts(
    model: Any,
    vocab: Any,
    text: np.ndarray,
    masks: list[int],
    words: Sequence[np.ndarray],
    max_len: int,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(video [N, H], text [N, H]) float32 on the model's device: per segment, `[CLS] template
    [>] video [SEP]` through `model` (video cut to fit `max_len`), then the mean of the video
    tokens' last hidden states and the mean at the template's [MASK]s. Differentiable (grad
    is the caller's choice)."""
    from videobert.model import CLS, SEP, TEXT_TYPE, VIDEO_SEP, VIDEO_TYPE

    device = next(model.parameters()).device
    room = max_len - len(text) - 3
    if room < 1:
        raise ValueError(f"the template takes {len(text)} tokens: no room for video in {max_len}")
    video_parts, text_parts = [], []
    mask_at = torch.as_tensor([1 + m for m in masks], device=device)
    for start in range(0, len(words), batch_size):
        part = [
            np.asarray(vocab.video_ids(np.asarray(w, np.int64)))[:room]
            for w in words[start : start + batch_size]
        ]
        width = len(text) + 3 + max(len(v) for v in part)
        ids = np.zeros((len(part), width), np.int64)
        types = np.zeros_like(ids)
        seq_ids = np.zeros_like(ids)
        video = np.zeros((len(part), width), np.float32)
        for row, v in enumerate(part):
            sequence = np.concatenate([[CLS], text, [VIDEO_SEP], v, [SEP]])
            n = len(sequence)
            ids[row, :n], seq_ids[row, :n] = sequence, 1
            types[row, :n] = np.concatenate(
                [np.full(len(text) + 2, TEXT_TYPE), np.full(len(v) + 1, VIDEO_TYPE)]
            )
            video[row, len(text) + 2 : n - 1] = 1.0
        mask = None if seq_ids.all() else torch.as_tensor(seq_ids, device=device)
        hidden = model.encode(
            torch.as_tensor(ids, device=device), torch.as_tensor(types, device=device), seq_ids=mask
        ).float()  # [B, T, H]
        weights = torch.as_tensor(video, device=device)
        video_parts.append((hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True))
        text_parts.append(hidden[:, mask_at].mean(1))
    return torch.cat(video_parts), torch.cat(text_parts)


def s3d_means(features: Sequence[np.ndarray]) -> torch.Tensor:
    """[N, dim] float32: the mean clip feature of each segment ([clips, dim] float16 each)."""
    return torch.as_tensor(np.stack([np.asarray(f, np.float32).mean(0) for f in features]))


def feature_matrix(parts: dict[str, torch.Tensor], feature_set: str) -> tuple[torch.Tensor, list[int]]:
    """The feature set's parts concatenated [N, sum dims], and each part's width."""
    chosen = [parts[p] for p in FEATURE_SETS[feature_set]]
    return torch.cat(chosen, 1), [int(p.shape[1]) for p in chosen]


# ---- the captioner -----------------------------------------------------------------------------


class CaptionModel(nn.Module):
    """Pooled segment features -> caption word logits (module doc): a transformer
    encoder-decoder whose encoder tokens are the standardised, projected feature parts."""

    def __init__(
        self,
        part_dims: Sequence[int],
        vocab_size: int,
        hidden: int = 128,
        layers: int = 2,
        heads: int = 8,
        dropout: float = 0.4,
        max_words: int = 20,
    ) -> None:
        super().__init__()
        self.part_dims = [int(d) for d in part_dims]
        total = sum(self.part_dims)
        self.register_buffer("mean", torch.zeros(total))
        self.register_buffer("std", torch.ones(total))
        self.project = nn.ModuleList(nn.Linear(d, hidden) for d in self.part_dims)
        self.part_embedding = nn.Parameter(torch.zeros(len(self.part_dims), hidden))
        self.word_embedding = nn.Embedding(vocab_size, hidden, padding_idx=PAD)
        self.position_embedding = nn.Embedding(max_words + 2, hidden)
        self.dropout = nn.Dropout(dropout)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout, batch_first=True),
            layers,
            enable_nested_tensor=False,
        )
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(hidden, heads, 4 * hidden, dropout, batch_first=True), layers
        )
        self.out = nn.Linear(hidden, vocab_size)
        self.hidden = hidden
        use_fast_dropout(self)  # every nn.Dropout above: torch's CPU masks were a third of a step

    def standardise_with(self, features: torch.Tensor) -> None:
        """Fix the input statistics to those of the training features [N, sum dims]."""
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0, unbiased=False) + 1e-6 * features.abs().max().clamp_min(1e-12))

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """[B, sum dims] -> memory [B, parts, H]."""
        x = (features.float() - self.mean) / self.std
        chunks = torch.split(x, self.part_dims, dim=1)
        tokens = torch.stack([p(c) for p, c in zip(self.project, chunks, strict=True)], 1)
        return self.encoder(self.dropout(tokens + self.part_embedding))

    def decode(self, memory: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """[B, T] word ids (from <bos>) -> [B, T, vocab] next-word logits."""
        length = words.shape[1]
        positions = torch.arange(length, device=words.device)
        x = self.word_embedding(words) * math.sqrt(self.hidden) + self.position_embedding(positions)
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=words.device), 1)
        hidden = self.decoder(
            self.dropout(x), memory, tgt_mask=causal, tgt_key_padding_mask=words == PAD, tgt_is_causal=True
        )
        return self.out(hidden)

    def forward(self, features: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(features), words)

    def settings(self) -> dict[str, Any]:
        """What rebuilds it (`from_settings`)."""
        first = self.encoder.layers[0]
        return {
            "part_dims": self.part_dims,
            "vocab_size": self.out.out_features,
            "hidden": self.hidden,
            "layers": len(self.encoder.layers),
            "heads": first.self_attn.num_heads,
            "dropout": float(self.dropout.p),
            "max_words": self.position_embedding.num_embeddings - 2,
        }

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> CaptionModel:
        return cls(**settings)


def caption_loss(model: CaptionModel, features: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each next word (teacher forcing), padding ignored."""
    # Columns of padding only are cut: the batch costs its longest caption, not max_words.
    captions = captions[:, : int((captions != PAD).sum(1).max())]
    logits = model(features, captions[:, :-1])
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), captions[:, 1:].reshape(-1), ignore_index=PAD
    )


def _strip(ids: Sequence[int]) -> list[int]:
    out = []
    for i in ids:
        if i in (EOS, PAD):
            break
        out.append(int(i))
    return out


@torch.no_grad()
def greedy_decode(model: CaptionModel, features: torch.Tensor, max_words: int) -> list[list[int]]:
    """The most likely next word, step by step, until <eos> (or `max_words`): ids per segment."""
    memory = model.encode(features)
    words = torch.full((len(features), 1), BOS, dtype=torch.long, device=features.device)
    done = torch.zeros(len(features), dtype=torch.bool, device=features.device)
    for _ in range(max_words + 1):
        step = model.decode(memory, words)[:, -1].argmax(-1)
        step = torch.where(done, torch.full_like(step, PAD), step)
        words = torch.cat([words, step[:, None]], 1)
        done |= step == EOS
        if bool(done.all()):
            break
    return [_strip(row[1:].tolist()) for row in words]


@torch.no_grad()
def beam_decode(model: CaptionModel, features: torch.Tensor, max_words: int, beam: int) -> list[list[int]]:
    """Beam search per segment: `beam` hypotheses extended by their `beam` best words until
    every one has ended (<eos>) or reached `max_words`; the finished one with the best mean
    log-probability per token wins (with `beam` 1 this is `greedy_decode`)."""
    memory = model.encode(features)
    results = []
    for n in range(len(features)):
        alive: list[tuple[list[int], float]] = [([BOS], 0.0)]
        finished: list[tuple[list[int], float]] = []
        for _ in range(max_words + 1):
            prefixes = torch.as_tensor([seq for seq, _ in alive], device=features.device)
            logp = torch.log_softmax(
                model.decode(memory[n : n + 1].expand(len(alive), -1, -1), prefixes)[:, -1], -1
            )
            top = logp.topk(min(beam, logp.shape[-1]), -1)
            candidates = [
                (seq + [int(w)], score + float(v))
                for (seq, score), values, ids in zip(alive, top.values, top.indices, strict=True)
                for v, w in zip(values, ids, strict=True)
            ]
            candidates.sort(key=lambda c: -c[1])
            alive = []
            for seq, score in candidates:
                (finished if seq[-1] == EOS else alive).append((seq, score))
                if len(alive) == beam:
                    break
            # No early stop once `beam` hypotheses have finished: short ones that ended early
            # (a skipped word, then <eos>) would win by default over the longer, likelier ones.
            if not alive:
                break
        pool = finished or alive
        best = max(pool, key=lambda c: c[1] / (len(c[0]) - 1))
        results.append(_strip(best[0][1:]))
    return results


def decode_captions(
    model: CaptionModel, features: torch.Tensor, max_words: int, beam: int
) -> list[list[int]]:
    """`beam_decode`, or `greedy_decode` for a beam of 1."""
    model.eval()
    if beam <= 1:
        return greedy_decode(model, features, max_words)
    return beam_decode(model, features, max_words, beam)


# ---- training (one process; pipelines/finetune_caption.py runs it in a Ray Train worker) --------


@dataclass
class CaptionTask:
    """Everything the training needs, shipped to its Ray Train worker."""

    settings: FinetuneConfig
    model_uri: str
    """The pinned pretrained version, models:/<name>/<version>."""
    tokenizer_uri: str
    """The pretrained model's text tokenizer (the template's)."""
    s3: S3Config
    tracking_uri: str
    run_id: str
    vocab: list[str]
    """CaptionVocab.words."""
    train_words: list[np.ndarray]
    train_s3d: list[np.ndarray]
    """Per training segment: its clips' features [clips, dim] (float16)."""
    train_captions: list[str]
    test_words: list[np.ndarray]
    test_s3d: list[np.ndarray]
    feature_sets: tuple[str, ...] = tuple(FEATURE_SETS)


@dataclass
class TrainedCaptioners:
    """What training returns: each feature set's captioner, losses and test captions."""

    states: dict[str, dict[str, torch.Tensor]]
    settings: dict[str, dict[str, Any]]
    """CaptionModel.settings() per feature set."""
    test_captions: dict[str, list[str]]
    losses: dict[str, list[tuple[int, float]]]
    seconds: dict[str, float]
    """Training seconds per feature set (decoding not included), and `features`."""
    encoder: dict[str, torch.Tensor] | None = None
    """Unfrozen: the registered set's fine-tuned VideoBERT weights; None: the pretrained ones."""
    steps: int = 0
    train_segments: int = 0


def _parts(
    model: Any, vocab: Any, template: tuple[np.ndarray, list[int]], words: Sequence[np.ndarray], max_len: int
) -> dict[str, torch.Tensor]:
    video, text = segment_parts(model, vocab, template[0], template[1], words, max_len)
    return {"video": video, "text": text}


def train_captioners(task: CaptionTask, log_metrics: bool = True) -> TrainedCaptioners:
    """Features of every segment, then one captioner per feature set (same seed, same batches),
    logging `<set>_loss` every `finetune.log_every` steps into the run (when `log_metrics`),
    then each one's captions of the test segments (see the module doc)."""
    from videobert.embedding import embedding_max_len
    from videobert.registry import load_registered_model
    from videobert.text_tokenizer import TextTokenizer
    from videobert.tracking import MetricsLogger, use_tracking_uri

    settings, cap = task.settings, task.settings.captioner
    use_tracking_uri(task.tracking_uri)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pretrained, joint_vocab, meta = load_registered_model(task.model_uri)
    pretrained = pretrained.to(device).eval()
    max_len = embedding_max_len(pretrained, meta)
    encode = TextTokenizer.load(task.tokenizer_uri, task.s3).encode
    template = template_ids(cap.template, encode, joint_vocab)
    vocab = CaptionVocab(task.vocab)
    captions = caption_tensor(vocab, task.train_captions, cap.max_caption_words).to(device)

    started = time.perf_counter()
    with torch.no_grad():
        train_parts = _parts(pretrained, joint_vocab, template, task.train_words, max_len)
        test_parts = _parts(pretrained, joint_vocab, template, task.test_words, max_len)
    train_parts["s3d"] = s3d_means(task.train_s3d).to(device)
    test_parts["s3d"] = s3d_means(task.test_s3d).to(device)
    seconds = {"features": time.perf_counter() - started}
    logger = MetricsLogger(task.run_id, task.tracking_uri) if log_metrics else None
    trained = TrainedCaptioners(
        {}, {}, {}, {}, seconds, steps=cap.steps, train_segments=len(task.train_words)
    )
    batch_size = min(cap.batch_size, len(task.train_words))
    for name in task.feature_sets:
        started = time.perf_counter()
        torch.manual_seed(settings.seed)
        rng = np.random.default_rng(settings.seed)
        features, dims = feature_matrix(train_parts, name)
        model = CaptionModel(
            dims, len(vocab), cap.hidden, cap.layers, cap.heads, cap.dropout, cap.max_caption_words
        ).to(device)
        model.standardise_with(features)
        groups: list[dict[str, Any]] = [{"params": list(model.parameters()), "lr": cap.lr}]
        encoder = None
        if not cap.freeze_pretrained and "video" in FEATURE_SETS[name]:
            encoder = copy.deepcopy(pretrained).train()
            groups.append({"params": list(encoder.parameters()), "lr": cap.encoder_lr})
        optimizer = torch.optim.Adam(groups)
        model.train()
        losses = []
        for step in range(1, cap.steps + 1):
            batch = torch.as_tensor(rng.choice(len(features), batch_size, replace=False), device=device)
            if encoder is not None:
                parts = _parts(
                    encoder, joint_vocab, template, [task.train_words[i] for i in batch.tolist()], max_len
                )
                parts["s3d"] = train_parts["s3d"][batch]
                inputs = feature_matrix(parts, name)[0]
            else:
                inputs = features[batch]
            loss = caption_loss(model, inputs, captions[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % settings.log_every == 0 or step == cap.steps:
                losses.append((step, float(loss.item())))
                if logger is not None:
                    logger.log(step, {f"{name}_loss": losses[-1][1]})
                log.info("%s captioner step %d/%d: loss %.4g", name, step, cap.steps, losses[-1][1])
        trained.seconds[name] = time.perf_counter() - started
        if encoder is not None:
            encoder.eval()
            with torch.no_grad():
                test_parts_here = {**_parts(encoder, joint_vocab, template, task.test_words, max_len)}
            test_parts_here["s3d"] = test_parts["s3d"]
            if name == REGISTERED:
                from videobert.model import weights_state_dict

                trained.encoder = weights_state_dict(encoder)
        else:
            test_parts_here = test_parts
        model.eval()
        test_features = feature_matrix(test_parts_here, name)[0]
        ids = decode_captions(model, test_features, cap.max_caption_words, cap.beam_size)
        trained.test_captions[name] = [vocab.decode(i) for i in ids]
        trained.states[name] = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        trained.settings[name] = model.settings()
        trained.losses[name] = losses
    return trained


CAPTIONERS_FILE = "{}.safetensors"
TRAINED_FILE = "trained.json"
ENCODER_FILE = "encoder.safetensors"


def save_trained(trained: TrainedCaptioners, directory: str | Path) -> None:
    """Into a (checkpoint) directory: safetensors per captioner, the rest as JSON."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, state in trained.states.items():
        save_file(state, str(directory / CAPTIONERS_FILE.format(name)))
    if trained.encoder is not None:
        save_file({k: v.contiguous() for k, v in trained.encoder.items()}, str(directory / ENCODER_FILE))
    info = {k: v for k, v in asdict(trained).items() if k not in ("states", "encoder")}
    (directory / TRAINED_FILE).write_text(json.dumps(info))


def load_trained(directory: str | Path) -> TrainedCaptioners:
    from safetensors.torch import load_file

    directory = Path(directory)
    info = json.loads((directory / TRAINED_FILE).read_text())
    states = {name: load_file(str(directory / CAPTIONERS_FILE.format(name))) for name in info["settings"]}
    encoder = load_file(str(directory / ENCODER_FILE)) if (directory / ENCODER_FILE).exists() else None
    info["losses"] = {k: [tuple(x) for x in v] for k, v in info["losses"].items()}
    return TrainedCaptioners(states=states, encoder=encoder, **info)


# ---- metrics -----------------------------------------------------------------------------------

_JAVA_WARNED = False


def java_available() -> bool:
    return shutil.which("java") is not None


@dataclass
class CaptionScores:
    """Micro-averaged scores of generated captions against their references."""

    metrics: dict[str, float]
    missing: dict[str, str] = field(default_factory=dict)
    """metric -> why it is not in `metrics` (METEOR without Java)."""


def _python_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """The PTB tokenizer's output, near enough, without Java: lower-case words, no punctuation."""
    return {k: [" ".join(caption_words(c)) for c in v] for k, v in captions.items()}


EMPTY_CAPTION = "<unk>"
"""Scored in place of an empty generated caption (the COCO tools cannot take one)."""


def score_captions(references: dict[str, list[str]], candidates: dict[str, str]) -> CaptionScores:
    """BLEU-3/4, METEOR, ROUGE-L and CIDEr of `candidates` (id -> caption) against `references`
    (id -> captions), by pycocoevalcap (module doc)."""
    return score_caption_sets(references, {"": candidates})[""]


def score_caption_sets(
    references: dict[str, list[str]], sets: dict[str, dict[str, str]]
) -> dict[str, CaptionScores]:
    """`score_captions` of several candidate sets against the same references, with one run of
    the Java tokenizer and one METEOR process for them all (`CaptionScorer`)."""
    with CaptionScorer() as scorer:
        return scorer.score(references, sets)


class CaptionScorer:
    """pycocoevalcap's scorers as a context: METEOR's Java process starts on entry and ends on
    exit. It spends about 11 s loading its tables before its first score, so a stage that enters
    before training has that time overlapped (finetune-caption does)."""

    def __enter__(self) -> CaptionScorer:
        global _JAVA_WARNED
        self.java = java_available()
        self.meteor = None
        if self.java:
            from pycocoevalcap.meteor.meteor import Meteor

            with contextlib.redirect_stdout(io.StringIO()):
                self.meteor = Meteor()
        elif not _JAVA_WARNED:
            log.warning(
                "no `java` on PATH: captions are tokenised in Python and METEOR is not computed "
                "(pycocoevalcap runs Java for both; the infra/ image has a JRE)"
            )
            _JAVA_WARNED = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.meteor = None  # its __del__ ends the Java process

    def score(
        self, references: dict[str, list[str]], sets: dict[str, dict[str, str]]
    ) -> dict[str, CaptionScores]:
        """BLEU-3/4, METEOR, ROUGE-L and CIDEr of each candidate set (name -> id -> caption)
        against `references` (id -> captions). pycocoevalcap's printing goes to the log."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        keys = list(references)
        candidates = {
            f"{name}\t{k}": [captions[k].strip() or EMPTY_CAPTION]
            for name, captions in sets.items()
            for k in keys
        }
        chatter = io.StringIO()
        scores = {}
        with contextlib.redirect_stdout(chatter):
            if self.java:
                from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

                tokenizer = PTBTokenizer()
                gts = tokenizer.tokenize({k: [{"caption": c} for c in references[k]] for k in keys})
                tokenized = tokenizer.tokenize({k: [{"caption": v[0]}] for k, v in candidates.items()})
            else:
                gts = _python_tokenize({k: references[k] for k in keys})
                tokenized = _python_tokenize(candidates)
            for name in sets:
                res = {k: [tokenized[f"{name}\t{k}"][0] or EMPTY_CAPTION] for k in keys}
                bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
                metrics = {"bleu3": float(bleu[2]), "bleu4": float(bleu[3])}
                missing = {}
                if self.meteor is not None:
                    metrics["meteor"] = float(self.meteor.compute_score(gts, res)[0])
                else:
                    missing["meteor"] = "no `java` on PATH (pycocoevalcap's METEOR runs Java)"
                metrics["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
                metrics["cider"] = float(Cider().compute_score(gts, res)[0])
                scores[name] = CaptionScores(metrics, missing)
        if chatter.getvalue().strip():
            log.debug("pycocoevalcap: %s", chatter.getvalue().strip())
        return scores


def object_named_rate(captions: Sequence[str], objects: Sequence[str | None]) -> float | None:
    """The share of captions that name their segment's object (a whole word); None when no
    segment has one."""
    pairs = [(c, o) for c, o in zip(captions, objects, strict=True) if o]
    if not pairs:
        return None
    named = sum(set(caption_words(o)) <= set(caption_words(c)) for c, o in pairs)
    return named / len(pairs)
