"""The text WordPiece tokenizer (Hugging Face `tokenizers`), BERT-style and lower-cased.

Either trained on the corpus sentences (`TextTokenizer.train`) or built from an existing
vocab.txt such as BERT uncased (`TextTokenizer.from_vocab_file`). Ids are the tokenizer's
own: `encode` adds no special tokens, and the model maps these ids into its joint vocabulary.
A trained vocabulary starts with BERT's specials ([PAD], [UNK], [CLS], [SEP], [MASK]) so it
has the same layout as BERT's.

Saved under `<output>/text/<version>/` as tokenizer.json, vocab.txt and meta.json. The
version is a content hash of the vocabulary (in id order) and the lower-casing flag.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from videobert import storage
from videobert.config import S3Config
from videobert.tables import Layout

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
UNK = "[UNK]"
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
META_FILE = "meta.json"


def _bert_style(model: models.Model, lowercase: bool) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer


class TextTokenizer:
    """A WordPiece tokenizer with a content-hash version."""

    def __init__(self, tokenizer: Tokenizer, lowercase: bool, metadata: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.lowercase = lowercase
        self.metadata = dict(metadata or {})

    @classmethod
    def train(cls, sentences: Iterable[str], vocab_size: int, lowercase: bool = True) -> TextTokenizer:
        """Train WordPiece on sentences (the corpus transcripts)."""
        tokenizer = _bert_style(models.WordPiece(unk_token=UNK), lowercase)
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False
        )
        counted = _Counting(sentences)
        tokenizer.train_from_iterator(counted, trainer=trainer)
        return cls(
            tokenizer,
            lowercase,
            {"source": "trained", "requested_vocab_size": vocab_size, "trained_sentences": counted.count},
        )

    @classmethod
    def from_vocab_file(
        cls, path_or_uri: str, lowercase: bool = True, s3: S3Config | None = None
    ) -> TextTokenizer:
        """Build from a vocab.txt (one token per line, line number = id), e.g. BERT uncased."""
        lines = storage.read_bytes(path_or_uri, s3).decode("utf-8").splitlines()
        vocab: dict[str, int] = {}
        for token in lines:
            token = token.rstrip("\r")
            if token and token not in vocab:
                vocab[token] = len(vocab)
        if UNK not in vocab:
            raise ValueError(f"{path_or_uri}: a WordPiece vocab needs an {UNK} token")
        tokenizer = _bert_style(models.WordPiece(vocab, unk_token=UNK), lowercase)
        return cls(tokenizer, lowercase, {"source": path_or_uri})

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    @property
    def vocab(self) -> list[str]:
        """Tokens in id order."""
        by_id = self.tokenizer.get_vocab()
        return sorted(by_id, key=by_id.__getitem__)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def version(self) -> str:
        digest = hashlib.sha256(f"lowercase={self.lowercase}\n".encode())
        digest.update("\n".join(self.vocab).encode())
        return digest.hexdigest()[:16]

    def meta_json(self) -> dict[str, Any]:
        return {
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            **self.metadata,
            "version": self.version,
            "vocab_size": self.vocab_size,
            "lowercase": self.lowercase,
        }

    def save(self, uri: str, s3: S3Config | None = None) -> str:
        """Write tokenizer.json, vocab.txt and (last, as the commit mark) meta.json into `uri`."""
        storage.write_bytes(storage.join(uri, TOKENIZER_FILE), self.tokenizer.to_str().encode(), s3)
        storage.write_bytes(storage.join(uri, VOCAB_FILE), ("\n".join(self.vocab) + "\n").encode(), s3)
        meta = self.meta_json()
        self.metadata["created_at"] = meta["created_at"]
        storage.write_bytes(storage.join(uri, META_FILE), json.dumps(meta, indent=2).encode(), s3)
        return uri

    def save_to_output(self, output: str, s3: S3Config | None = None) -> str:
        """Write under `<output>/text/<version>/`; returns that directory."""
        return self.save(Layout(output).tokenizer(self.version), s3)

    @classmethod
    def load(cls, uri: str, s3: S3Config | None = None) -> TextTokenizer:
        meta = json.loads(storage.read_bytes(storage.join(uri, META_FILE), s3))
        tokenizer = Tokenizer.from_str(storage.read_bytes(storage.join(uri, TOKENIZER_FILE), s3).decode())
        loaded = cls(tokenizer, bool(meta["lowercase"]), meta)
        if loaded.version != meta["version"]:
            raise ValueError(
                f"{uri}: vocabulary does not match version {meta['version']} (corrupt tokenizer)"
            )
        return loaded


class _Counting:
    """An iterable that counts what passes through it (the trainer consumes it once)."""

    def __init__(self, items: Iterable[str]):
        self.items = items
        self.count = 0

    def __iter__(self):
        for item in self.items:
            self.count += 1
            yield item


def list_tokenizers(output: str, s3: S3Config | None = None) -> list[dict[str, Any]]:
    """meta.json of every saved tokenizer under `<output>/text/`, with its `uri`."""
    found = []
    for meta_uri in storage.list_files(Layout(output).text, s3, suffix="/" + META_FILE):
        meta = json.loads(storage.read_bytes(meta_uri, s3))
        meta["uri"] = meta_uri[: -len(META_FILE) - 1]
        found.append(meta)
    return found


def latest_tokenizer(
    output: str,
    s3: S3Config | None = None,
    source: str | None = None,
    lowercase: bool | None = None,
    requested_vocab_size: int | None = None,
) -> str | None:
    """URI of the newest saved tokenizer matching the filters, or None.

    `source` is "trained" or the vocab file it was built from; `requested_vocab_size` is the
    vocab_size a trained tokenizer was asked for (it may have fewer tokens on a small corpus).
    """
    matches = [
        meta
        for meta in list_tokenizers(output, s3)
        if (source is None or meta.get("source") == source)
        and (lowercase is None or meta.get("lowercase") == lowercase)
        and (requested_vocab_size is None or meta.get("requested_vocab_size") == requested_vocab_size)
    ]
    if not matches:
        return None
    return max(matches, key=lambda meta: (meta.get("created_at", ""), meta["version"]))["uri"]
