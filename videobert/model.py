"""The VideoBERT Transformer: one file, its config, named sizes from videobert.model_sizes (nanoGPT style).

Layout matches Hugging Face BERT (post-LayerNorm, GELU, learned positions, token types), so a
BERT checkpoint can initialise it (`init_from_bert`) and a trained model exports to
`BertForMaskedLM` (`export_hf`). Differences that are about speed, not maths:

- Q, K and V are one fused Linear (one matmul instead of three); `hf_to_videobert` /
  `videobert_to_hf` map the weights to BERT's names 1:1 otherwise.
- Attention is `scaled_dot_product_attention` (flash / memory-efficient kernels on GPU); on CPU,
  dropout draws its masks with videobert/dropout.py (torch's CPU masks cost a third of a step).
- The MLM head runs only at the masked positions: hidden states are gathered first, so the
  vocabulary projection (hidden x ~51k) costs 15% of what a dense head costs.
- Padding-free packing: several examples share one row; `seq_ids` numbers them (0 = padding)
  and attention is block-diagonal between them, positions restart per example. Linear layers
  (most of the compute) never see padding. We chose packing over length bucketing because
  bucketing sorts examples by length, which splits the three regimes (text-only examples are
  short, text+video ones long) into different batches; packing keeps every batch mixed.

No Ray, no DeepSpeed here: the parallel wrapping lives in videobert/training.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from videobert.dropout import Dropout, attention
from videobert.model_sizes import MODEL_SIZES

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[>]"]
PAD, UNK, CLS, SEP, MASK, VIDEO_SEP = range(len(SPECIAL_TOKENS))
TEXT_TYPE, VIDEO_TYPE = 0, 1
VIDEO_INPUTS = ("tokens", "features", "both")


class JointVocab:
    """One vocabulary for both modalities: specials, then text WordPiece ids, then visual words.

    Token shards keep the tokenizer's and the codebook's own ids; this class maps them into
    the joint id space, so shards do not change when the layout does.
    """

    def __init__(self, text_vocab: list[str] | int, num_visual: int) -> None:
        if isinstance(text_vocab, int):
            text_vocab = [f"[T{i}]" for i in range(text_vocab)]
        if not text_vocab or num_visual < 1:
            raise ValueError("JointVocab needs a non-empty text vocabulary and at least one visual word")
        self.text_vocab = list(text_vocab)
        self.num_visual = int(num_visual)
        self.text_offset = len(SPECIAL_TOKENS)
        self.video_offset = self.text_offset + len(self.text_vocab)

    @property
    def text_size(self) -> int:
        return len(self.text_vocab)

    @property
    def size(self) -> int:
        return self.video_offset + self.num_visual

    def text_ids(self, ids: Any) -> Any:
        """Tokenizer ids -> joint ids (works on ints, lists via numpy, arrays, tensors)."""
        return ids + self.text_offset

    def video_ids(self, ids: Any) -> Any:
        """Codebook ids -> joint ids."""
        return ids + self.video_offset

    def is_video(self, joint_ids: Any) -> Any:
        return joint_ids >= self.video_offset

    def tokens(self) -> list[str]:
        """Every joint id's string, in id order (visual words as `[V00042]`)."""
        width = max(5, len(str(self.num_visual - 1)))
        return SPECIAL_TOKENS + self.text_vocab + [f"[V{i:0{width}d}]" for i in range(self.num_visual)]

    def to_dict(self) -> dict[str, Any]:
        return {"specials": SPECIAL_TOKENS, "text_vocab": self.text_vocab, "num_visual": self.num_visual}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JointVocab:
        if data.get("specials", SPECIAL_TOKENS) != SPECIAL_TOKENS:
            raise ValueError("vocabulary was written with different special tokens")
        return cls(data["text_vocab"], data["num_visual"])


@dataclass
class VideoBertConfig:
    """Shape of the Transformer (names follow BERT's config)."""

    vocab_size: int
    """Joint vocabulary size (specials + text + visual words)."""
    hidden: int = 1024
    """Hidden size."""
    layers: int = 24
    """Transformer layers."""
    heads: int = 16
    """Attention heads."""
    intermediate: int = 4096
    """Feed-forward inner size."""
    max_positions: int = 512
    """Learned position embeddings (longest sequence)."""
    type_vocab_size: int = 2
    """Token types: text=0, video=1."""
    dropout: float = 0.1
    """Hidden and attention dropout."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (BERT's value)."""
    init_std: float = 0.02
    """Std of the normal initialisation."""
    video_input: str = "tokens"
    """What a video position takes in: `tokens` (visual-word embeddings, the paper), `features`
    (a projection of the clip's feature, CBT) or `both` (their sum)."""
    feature_dim: int = 1024
    """Size of a clip feature (S3D: 1024); used when video_input is not `tokens`."""
    nce_temperature: float = 0.1
    """Temperature of the InfoNCE loss on masked video positions (features, both)."""

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} must be divisible by heads {self.heads}")
        if self.video_input not in VIDEO_INPUTS:
            raise ValueError(
                f"video_input must be one of {', '.join(VIDEO_INPUTS)}, not {self.video_input!r}"
            )

    @property
    def takes_features(self) -> bool:
        return self.video_input != "tokens"

    @property
    def takes_words(self) -> bool:
        return self.video_input != "features"

    @classmethod
    def from_size(
        cls, size: str, vocab_size: int, max_positions: int = 512, **overrides: Any
    ) -> VideoBertConfig:
        if size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {size!r} (known: {', '.join(MODEL_SIZES)})")
        limit = MODEL_SIZES[size].max_positions
        if limit is not None and max_positions > limit:
            raise ValueError(f"model size {size!r} supports at most {limit} positions, not {max_positions}")
        shape = {**MODEL_SIZES[size].shape(), **overrides}
        return cls(vocab_size=vocab_size, max_positions=max_positions, **shape)


class Embeddings(nn.Module):
    def __init__(self, config: VideoBertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden)
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class FeatureProjection(nn.Module):
    """Clip feature -> hidden (CBT's continuous video input): LayerNorm, then Linear."""

    def __init__(self, config: VideoBertConfig) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(config.feature_dim, eps=1e-5)
        self.dense = nn.Linear(config.feature_dim, config.hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.dense(self.LayerNorm(features))


class ContrastiveHead(nn.Module):
    """Hidden state at a masked video position -> the space of projected clip features."""

    def __init__(self, config: VideoBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden, config.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(F.gelu(self.dense(x))))


def info_nce(
    predicted: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    clip_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE per row [M]: row i's positive is target i, the other targets are its negatives.

    Scores are cosine similarities / `temperature`. Targets with the same `clip_ids` as the
    positive (the same clip, twice in the batch) are left out of the negatives.
    """
    if not len(predicted):
        return predicted.sum(-1)  # [0]: keeps the graph for every parameter
    scores = F.normalize(predicted.float(), dim=-1) @ F.normalize(targets.float(), dim=-1).T / temperature
    if clip_ids is not None:
        same = clip_ids[:, None] == clip_ids[None, :]
        same.fill_diagonal_(False)
        scores = scores.masked_fill(same, float("-inf"))
    labels = torch.arange(len(predicted), device=predicted.device)
    return F.cross_entropy(scores, labels, reduction="none")


class SelfAttention(nn.Module):
    def __init__(self, config: VideoBertConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden)  # BERT's query, key, value fused
        self.dense = nn.Linear(config.hidden, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = config.dropout
        self.out_dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, hidden = x.shape
        # [B, T, 3H] -> [B, T, 3, heads, H/heads] -> 3 x [B, heads, T, H/heads]
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        y = attention(q, k, v, mask, dropout)
        # [B, heads, T, H/heads] -> [B, T, H]
        y = y.transpose(1, 2).reshape(batch, length, hidden)
        return self.LayerNorm(x + self.out_dropout(self.dense(y)))  # post-LN, as BERT


class Block(nn.Module):
    def __init__(self, config: VideoBertConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(config)
        self.intermediate = nn.Linear(config.hidden, config.intermediate)
        self.output = nn.Linear(config.intermediate, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.LayerNorm(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))


class MlmHead(nn.Module):
    """BERT's prediction head; `decoder.weight` is tied to the word embeddings."""

    def __init__(self, config: VideoBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden, config.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(F.gelu(self.dense(x))))


class VideoBert(nn.Module):
    def __init__(self, config: VideoBertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.mlm_head = MlmHead(config)
        self.pooler = nn.Linear(config.hidden, config.hidden)
        self.alignment = nn.Linear(config.hidden, 1)  # logit: is the text aligned with the video?
        if config.takes_features:
            self.feature_projection = FeatureProjection(config)
            self.contrastive_head = ContrastiveHead(config)
        self.apply(self._init_weights)
        self.mlm_head.decoder.weight = self.embeddings.word_embeddings.weight  # tied, as BERT

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def encode(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        feature_positions: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, T] ids -> [B, T, H] hidden states.

        `seq_ids` [B, T] numbers the packed examples in a row (0 = padding); None means one
        unpadded example per row, which lets SDPA use its fastest (mask-free) kernel.
        A model that takes features gets `features` [N, feature_dim] at `feature_positions`
        (flat indices into B*T, the video positions that are not masked); see `embed_inputs`.
        """
        batch, length = input_ids.shape
        if length > self.config.max_positions:
            raise ValueError(f"sequence of {length} tokens exceeds max_positions {self.config.max_positions}")
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
        mask = None
        if seq_ids is not None:
            # [B, T] -> [B, 1, T, T]: a token attends only to tokens of its own packed example
            mask = (seq_ids[:, :, None] == seq_ids[:, None, :]).unsqueeze(1)
        x = self.embed_inputs(input_ids, token_type_ids, position_ids, feature_positions, features)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        position_ids: torch.Tensor,
        feature_positions: torch.Tensor | None,
        features: torch.Tensor | None,
    ) -> torch.Tensor:
        """Input embeddings [B, T, H].

        `tokens`: the word embedding of each id (visual words at video positions).
        `features`: at `feature_positions` the projected clip feature replaces the word
        embedding (a masked video position keeps [MASK]'s embedding: CBT's learned mask vector).
        `both`: the projected feature is added to the visual word's embedding.
        Position and token-type embeddings, LayerNorm and dropout as BERT, on the sum.
        """
        emb = self.embeddings
        words = emb.word_embeddings(input_ids)
        if self.config.takes_features:
            if feature_positions is None or features is None:
                raise ValueError(
                    f"this model takes clip features (video_input {self.config.video_input!r}): "
                    "pass feature_positions and features"
                )
            flat = words.reshape(-1, words.shape[-1])
            projected = self.feature_projection(features.to(flat.dtype))
            if self.config.video_input == "features":
                flat = flat.index_copy(0, feature_positions, projected)
            else:
                flat = flat.index_add(0, feature_positions, projected)
            words = flat.view_as(words)
        x = words + emb.position_embeddings(position_ids) + emb.token_type_embeddings(token_type_ids)
        return emb.dropout(emb.LayerNorm(x))

    def contrastive_outputs(
        self, hidden: torch.Tensor, positions: torch.Tensor, target_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted, target) [M, H]: the head's output at masked video `positions` and the
        projection of those clips' true features."""
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        predicted = self.contrastive_head(picked)
        return predicted, self.feature_projection(target_features.to(predicted.dtype))

    def mlm_logits(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [M, V] at `positions` (flat indices into B*T) only."""
        # [B, T, H] -> [B*T, H] -> [M, H]
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        return self.mlm_head(picked)

    def alignment_logits(self, hidden: torch.Tensor, cls_positions: torch.Tensor) -> torch.Tensor:
        """One logit per `[CLS]` at `cls_positions` (flat indices into B*T): [N]."""
        # [B, T, H] -> [B*T, H] -> [N, H]
        cls = hidden.reshape(-1, hidden.shape[-1]).index_select(0, cls_positions)
        return self.alignment(torch.tanh(self.pooler(cls))).squeeze(-1)  # [N, 1] -> [N]

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        mlm_positions: torch.Tensor | None = None,
        cls_positions: torch.Tensor | None = None,
        feature_positions: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        nce_positions: torch.Tensor | None = None,
        nce_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        hidden = self.encode(input_ids, token_type_ids, position_ids, seq_ids, feature_positions, features)
        out = {"hidden": hidden}
        if nce_positions is not None and nce_features is not None:
            out["nce_predicted"], out["nce_targets"] = self.contrastive_outputs(
                hidden, nce_positions, nce_features
            )
            out["nce_temperature"] = torch.tensor(self.config.nce_temperature)
        if mlm_positions is not None:
            out["mlm_logits"] = self.mlm_logits(hidden, mlm_positions)
        if cls_positions is not None:
            out["alignment_logits"] = self.alignment_logits(hidden, cls_positions)
        return out

    def num_params(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())  # tied weights counted once
        if exclude_embeddings:
            total -= self.embeddings.word_embeddings.weight.numel()
        return total

    def flops_per_token(self, seq_len: int, masked_fraction: float = 0.15) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), counted from the shapes."""
        c = self.config
        per_layer = 2 * (4 * c.hidden * c.hidden + 2 * c.hidden * c.intermediate)  # matmuls
        per_layer += 2 * 2 * seq_len * c.hidden  # QK^T and AV
        head = masked_fraction * 2 * (c.hidden * c.hidden + c.hidden * c.vocab_size)
        return 3.0 * (c.layers * per_layer + head)


# ---------------------------------------------------------------------------------------------
# Safe weights on disk (the tied decoder weight is stored once)

TIED_KEY = "mlm_head.decoder.weight"


def weights_state_dict(model: VideoBert) -> dict[str, torch.Tensor]:
    """Contiguous fp32 CPU tensors without the tied duplicate: ready for safetensors."""
    return {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in model.state_dict().items()
        if k != TIED_KEY
    }


def load_weights(model: VideoBert, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in state.items() if k != TIED_KEY}, strict=False
    )
    missing = [k for k in missing if k != TIED_KEY]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def save_pretrained(model: VideoBert, vocab: JointVocab, out_dir: str | os.PathLike[str]) -> None:
    """model.safetensors + config.json + vocab.json: everything `load_pretrained` needs."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights_state_dict(model), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(asdict(model.config), indent=2))
    (out / "vocab.json").write_text(json.dumps(vocab.to_dict()))


def load_pretrained(path: str | os.PathLike[str], device: str = "cpu") -> tuple[VideoBert, JointVocab]:
    from safetensors.torch import load_file

    root = Path(path)
    config = VideoBertConfig(**json.loads((root / "config.json").read_text()))
    vocab = JointVocab.from_dict(json.loads((root / "vocab.json").read_text()))
    model = VideoBert(config)
    load_weights(model, load_file(str(root / "model.safetensors"), device=device))
    return model.to(device).eval(), vocab


# ---------------------------------------------------------------------------------------------
# Hugging Face BERT interop

HF_LAYER_NAMES = {  # ours (under layers.N.) -> BERT's (under encoder.layer.N.)
    "attention.dense": "attention.output.dense",
    "attention.LayerNorm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "LayerNorm": "output.LayerNorm",
}


def videobert_to_hf(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Our encoder + MLM head weights under `BertForMaskedLM` names."""
    hf: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("embeddings."):
            hf["bert." + key] = value
    for i in range(layers):
        ours, theirs = f"layers.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{ours}attention.qkv.{kind}"].chunk(3, dim=0)
            hf[f"{theirs}attention.self.query.{kind}"] = q
            hf[f"{theirs}attention.self.key.{kind}"] = k
            hf[f"{theirs}attention.self.value.{kind}"] = v
            for our_name, hf_name in HF_LAYER_NAMES.items():
                hf[f"{theirs}{hf_name}.{kind}"] = state[f"{ours}{our_name}.{kind}"]
    for kind in ("weight", "bias"):
        hf[f"cls.predictions.transform.dense.{kind}"] = state[f"mlm_head.dense.{kind}"]
        hf[f"cls.predictions.transform.LayerNorm.{kind}"] = state[f"mlm_head.LayerNorm.{kind}"]
    hf["cls.predictions.bias"] = state["mlm_head.decoder.bias"]
    hf["cls.predictions.decoder.weight"] = state["embeddings.word_embeddings.weight"]
    hf["cls.predictions.decoder.bias"] = state["mlm_head.decoder.bias"]
    return hf


def hf_to_videobert(hf: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """BERT encoder weights (BertModel or BertFor* names) -> our names (no heads except MLM when present)."""
    hf = {k.removeprefix("bert."): v for k, v in hf.items()}
    ours: dict[str, torch.Tensor] = {}
    for key, value in hf.items():
        if key.startswith("embeddings.") and "position_ids" not in key and "token_type_ids" not in key:
            ours[key] = value
    for i in range(layers):
        theirs, mine = f"encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            parts = [hf[f"{theirs}attention.self.{n}.{kind}"] for n in ("query", "key", "value")]
            ours[f"{mine}attention.qkv.{kind}"] = torch.cat(parts, dim=0)
            for our_name, hf_name in HF_LAYER_NAMES.items():
                ours[f"{mine}{our_name}.{kind}"] = hf[f"{theirs}{hf_name}.{kind}"]
    if "cls.predictions.transform.dense.weight" in hf:
        for kind in ("weight", "bias"):
            ours[f"mlm_head.dense.{kind}"] = hf[f"cls.predictions.transform.dense.{kind}"]
            ours[f"mlm_head.LayerNorm.{kind}"] = hf[f"cls.predictions.transform.LayerNorm.{kind}"]
    if "pooler.dense.weight" in hf:
        ours["pooler.weight"], ours["pooler.bias"] = hf["pooler.dense.weight"], hf["pooler.dense.bias"]
    return ours


def _load_bert_state(path_or_name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str] | None]:
    """A BERT checkpoint's state dict, config and vocab (local directory or Hub name)."""
    import transformers

    try:
        bert = transformers.BertForMaskedLM.from_pretrained(path_or_name)
    except OSError as error:
        raise RuntimeError(
            f"cannot load BERT checkpoint {path_or_name!r}: {error}. Offline, pass a local directory "
            "holding config.json + model.safetensors (e.g. one made with save_pretrained), "
            "or set model.init_from to null to start from random weights on purpose."
        ) from error
    vocab_file = Path(path_or_name) / "vocab.txt"
    vocab = vocab_file.read_text().splitlines() if vocab_file.is_file() else None
    return bert.state_dict(), bert.config.to_dict(), vocab


def init_from_bert(model: VideoBert, path_or_hf_name: str, vocab: JointVocab | None = None) -> None:
    """Copy the Transformer and the text embeddings from a BERT checkpoint.

    Text ids of our tokenizer are assumed to be the checkpoint's WordPiece ids (use its
    vocab.txt as `text.vocab`); specials are copied from BERT's rows of the same names when the
    checkpoint ships a vocab.txt. Visual-word rows, token type 1 and the alignment head stay random.
    """
    state, bert_config, bert_vocab = _load_bert_state(path_or_hf_name)
    c = model.config
    if (bert_config["hidden_size"], bert_config["num_hidden_layers"]) != (c.hidden, c.layers):
        raise ValueError(
            f"BERT checkpoint has hidden {bert_config['hidden_size']} x {bert_config['num_hidden_layers']} "
            f"layers; the model has hidden {c.hidden} x {c.layers} layers (choose the matching model.size)"
        )
    ours = hf_to_videobert(state, c.layers)
    word = ours.pop("embeddings.word_embeddings.weight")
    positions = ours.pop("embeddings.position_embeddings.weight")
    token_types = ours.pop("embeddings.token_type_embeddings.weight")
    with torch.no_grad():
        model.load_state_dict(ours, strict=False)
        n = min(c.max_positions, positions.shape[0])
        model.embeddings.position_embeddings.weight[:n] = positions[:n]
        model.embeddings.token_type_embeddings.weight[0] = token_types[0]
        embeddings = model.embeddings.word_embeddings.weight
        text_offset = vocab.text_offset if vocab else len(SPECIAL_TOKENS)
        text_size = vocab.text_size if vocab else c.vocab_size - text_offset
        count = min(text_size, word.shape[0])
        embeddings[text_offset : text_offset + count] = word[:count]
        if bert_vocab:
            index = {token: i for i, token in enumerate(bert_vocab)}
            for joint_id, token in enumerate(SPECIAL_TOKENS):
                if token in index:
                    embeddings[joint_id] = word[index[token]]


VOCAB_ROWS = ("embeddings.word_embeddings.weight", "mlm_head.decoder.bias")


def init_from_videobert(
    model: VideoBert,
    vocab: JointVocab,
    source: VideoBert,
    source_vocab: JointVocab,
    same_codebook: bool,
) -> dict[str, int]:
    """Continue from an earlier VideoBERT (e.g. the champion) whose vocabulary may differ.

    Everything but the vocabulary-sized rows is copied as is (same size required). Vocabulary
    rows move by meaning: specials by id, text tokens by their string, visual words by id only
    when both models use the same codebook (another codebook's word 7 is another cluster).
    Rows without a counterpart keep their fresh initialisation. Returns the rows copied.
    """
    if (source.config.hidden, source.config.layers) != (model.config.hidden, model.config.layers):
        raise ValueError(
            f"cannot continue from a {source.config.layers}x{source.config.hidden} model "
            f"into a {model.config.layers}x{model.config.hidden} one (model.size differs)"
        )
    source_index = {token: i for i, token in enumerate(source_vocab.text_vocab)}
    rows = [(i, i) for i in range(len(SPECIAL_TOKENS))]
    rows += [
        (vocab.text_offset + i, source_vocab.text_offset + source_index[token])
        for i, token in enumerate(vocab.text_vocab)
        if token in source_index
    ]
    copied = {"text_rows": len(rows) - len(SPECIAL_TOKENS), "visual_rows": 0}
    if same_codebook and source_vocab.num_visual == vocab.num_visual:
        rows += [(vocab.video_offset + i, source_vocab.video_offset + i) for i in range(vocab.num_visual)]
        copied["visual_rows"] = vocab.num_visual
    target_rows, source_rows = (torch.tensor(side) for side in zip(*rows, strict=True))

    source_state = source.state_dict()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name == TIED_KEY or name not in source_state:
                continue  # e.g. the feature projection when the source took visual words only
            value = source_state[name]
            if name in VOCAB_ROWS:
                tensor[target_rows] = value[source_rows].to(tensor.dtype)
            elif name == "embeddings.position_embeddings.weight":
                n = min(tensor.shape[0], value.shape[0])
                tensor[:n] = value[:n]
            else:
                tensor.copy_(value)
    return copied


VIDEO_INPUT_WEIGHTS = "videobert_video_input.safetensors"
VIDEO_INPUT_PREFIXES = ("feature_projection.", "contrastive_head.")


def export_hf(model: VideoBert, vocab: JointVocab, out_dir: str | os.PathLike[str]) -> None:
    """Write a `BertForMaskedLM` directory (config, safetensors weights, vocab.txt)."""
    import transformers

    c = model.config
    hf_config = transformers.BertConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        intermediate_size=c.intermediate,
        hidden_act="gelu",
        max_position_embeddings=c.max_positions,
        type_vocab_size=c.type_vocab_size,
        layer_norm_eps=c.layer_norm_eps,
        hidden_dropout_prob=c.dropout,
        attention_probs_dropout_prob=c.dropout,
        pad_token_id=PAD,
        video_input=c.video_input,  # tokens | features | both (config.json says which kind)
    )
    hf_model = transformers.BertForMaskedLM(hf_config)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    missing, unexpected = hf_model.load_state_dict(videobert_to_hf(state, c.layers), strict=False)
    missing = [k for k in missing if "position_ids" not in k and "token_type_ids" not in k]
    if missing or unexpected:
        raise RuntimeError(f"export mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = Path(out_dir)
    hf_model.save_pretrained(out)
    if c.takes_features:
        # BertForMaskedLM has no place for them: the clip-feature projection (feature ->
        # hidden, added to / replacing the video positions' word embeddings) and the InfoNCE head.
        from safetensors.torch import save_file

        extra = {k: v for k, v in state.items() if k.startswith(VIDEO_INPUT_PREFIXES)}
        save_file(extra, str(out / VIDEO_INPUT_WEIGHTS))
        (out / "videobert_video_input.json").write_text(
            json.dumps(
                {
                    "video_input": c.video_input,
                    "feature_dim": c.feature_dim,
                    "nce_temperature": c.nce_temperature,
                    "weights": VIDEO_INPUT_WEIGHTS,
                    "usage": "inputs_embeds = word_embeddings(ids); at video positions with a clip "
                    "feature f: feature_projection.dense(LayerNorm(f)) replaces (features) or is "
                    "added to (both) the word embedding; then BERT's embeddings as usual",
                },
                indent=2,
            )
        )
    (out / "vocab.txt").write_text("\n".join(vocab.tokens()) + "\n")
    (out / "videobert_vocab.json").write_text(json.dumps(vocab.to_dict()))


def build_model(
    size: str, vocab: JointVocab, max_positions: int = 512, seed: int = 0, video_input: str = "tokens"
) -> VideoBert:
    """A randomly initialised model of a named size for this vocabulary (same weights per seed)."""
    torch.manual_seed(seed)
    return VideoBert(VideoBertConfig.from_size(size, vocab.size, max_positions, video_input=video_input))
