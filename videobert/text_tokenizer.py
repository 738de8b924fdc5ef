"""The text WordPiece tokenizer (Hugging Face `tokenizers`), BERT-style and lower-cased.

Either trained on the corpus sentences (`TextTokenizer.train`) or built from an existing
vocab.txt such as BERT uncased (`TextTokenizer.from_vocab_file`). Ids are the tokenizer's
own: `encode` adds no special tokens, and the model maps these ids into its joint vocabulary.
A trained vocabulary starts with BERT's specials ([PAD], [UNK], [CLS], [SEP], [MASK]) so it
has the same layout as BERT's.

Saved under `<output>/text/<version>/` as tokenizer.json, vocab.txt and meta.json. The
version is a content hash of the vocabulary (in id order) and the lower-casing flag.

Training is our own small WordPiece vocabulary trainer (`train_wordpiece_vocab`), not
`tokenizers`' WordPieceTrainer: that one breaks ties between equally frequent pairs in Rust
HashMap order, seeded per process, so two trainings on the same sentences gave different
vocabularies, versions and ids, and a killed-and-rerun pipeline would not match one that never
stopped. Ours is a deterministic function of the word counts (so of the sentences, in any
order). `tokenizers` still does normalisation, pre-tokenisation and encoding:
- words are counted with the tokenizer's own BERT normalizer and pre-tokenizer;
- vocabulary = specials, then every character seen both as a word-initial piece and as a
  `##` continuation (each group by code point), then merges in the order made;
- each merge joins the adjacent pair with the highest count over the corpus (words weighted
  by frequency), as BPE and `tokenizers`' trainer do; ("a", "##b") makes "ab", ("##a", "##b")
  makes "##ab". Ties go to the pair with the smallest (left id, right id): word-initial
  and older pieces first. That is `tokenizers`' own rule, but there the ids of the "##"
  pieces follow hash order; here every id is fixed (specials, alphabet by code point, merges
  in order), so the order is total and nothing depends on hash or set iteration order.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import heapq
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from videobert import storage, versions
from videobert.config import S3Config
from videobert.tables import Layout

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
UNK = "[UNK]"
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
META_FILE = "meta.json"
PREFIX = "##"  # WordPiece's continuing-subword prefix (models.WordPiece's default)


def _bert_style(model: models.Model, lowercase: bool) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer


def _wordpiece(tokens: Iterable[str], lowercase: bool, where: str) -> Tokenizer:
    """A BERT-style WordPiece tokenizer whose ids are the tokens' positions (repeats dropped)."""
    vocab: dict[str, int] = {}
    for token in tokens:
        if token and token not in vocab:
            vocab[token] = len(vocab)
    if UNK not in vocab:
        raise ValueError(f"{where}: a WordPiece vocab needs an {UNK} token")
    return _bert_style(models.WordPiece(vocab, unk_token=UNK), lowercase)


class TextTokenizer:
    """A WordPiece tokenizer with a content-hash version."""

    def __init__(self, tokenizer: Tokenizer, lowercase: bool, metadata: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.lowercase = lowercase
        self.metadata = dict(metadata or {})

    @classmethod
    def train(cls, sentences: Iterable[str], vocab_size: int, lowercase: bool = True) -> TextTokenizer:
        """Train WordPiece on sentences (the corpus transcripts); deterministic (module docstring)."""
        # An empty-vocab tokenizer only to split words exactly as the trained one will.
        splitter = _bert_style(models.WordPiece(unk_token=UNK), lowercase)
        word_counts: Counter[str] = Counter()
        num_sentences = 0
        for sentence in sentences:
            num_sentences += 1
            normalized = splitter.normalizer.normalize_str(sentence)
            word_counts.update(word for word, _ in splitter.pre_tokenizer.pre_tokenize_str(normalized))
        # Longer words encode as [UNK] whatever the vocabulary, so they get no merges.
        max_chars = models.WordPiece(unk_token=UNK).max_input_chars_per_word
        tokens = train_wordpiece_vocab(
            {w: n for w, n in word_counts.items() if len(w) <= max_chars}, vocab_size
        )
        return cls(
            _wordpiece(tokens, lowercase, "trained vocabulary"),
            lowercase,
            {"source": "trained", "requested_vocab_size": vocab_size, "trained_sentences": num_sentences},
        )

    @classmethod
    def from_vocab_file(
        cls, path_or_uri: str, lowercase: bool = True, s3: S3Config | None = None
    ) -> TextTokenizer:
        """Build from a vocab.txt (one token per line, line number = id), e.g. BERT uncased."""
        lines = storage.read_bytes(path_or_uri, s3).decode("utf-8").splitlines()
        tokenizer = _wordpiece((line.rstrip("\r") for line in lines), lowercase, path_or_uri)
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


def train_wordpiece_vocab(word_counts: Mapping[str, int], vocab_size: int) -> list[str]:
    """A WordPiece vocabulary (tokens in id order) from word counts, deterministically.

    Specials, then the alphabet, then BPE merges until `vocab_size` tokens or nothing is left
    to merge (rules and tie-break in the module docstring). If the alphabet alone would not fit,
    the most frequent characters are kept (ties by code point) and words holding any other
    character are left out: WordPiece encodes such words as [UNK] anyway.
    """
    if vocab_size < len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(SPECIAL_TOKENS)} special tokens")
    # Sorted words: ids and insertion orders below never depend on the caller's order.
    words = sorted(w for w, n in word_counts.items() if w and n > 0)
    char_counts: Counter[str] = Counter()
    for word in words:
        for char in word:
            char_counts[char] += word_counts[word]
    fits = (vocab_size - len(SPECIAL_TOKENS)) // 2  # each char takes two tokens: "c" and "##c"
    chars = sorted(sorted(char_counts, key=lambda c: (-char_counts[c], c))[:fits])
    tokens = SPECIAL_TOKENS + chars + [PREFIX + c for c in chars]
    ids = {token: i for i, token in enumerate(tokens)}

    # Words as lists of token ids; pairs are (left id, right id) — int tuples hash the same in
    # every process, and the merge order below never depends on dict or set order anyway.
    seqs: list[list[int]] = []
    freqs: list[int] = []
    for word in words:
        if all(c in ids for c in word):
            seqs.append([ids[word[0]], *(ids[PREFIX + c] for c in word[1:])])
            freqs.append(word_counts[word])
    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}  # pair -> indices of the words holding it
    for index, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:], strict=False):
            pair_counts[pair] = pair_counts.get(pair, 0) + freqs[index]
            where.setdefault(pair, set()).add(index)

    # Max-heap by (count, then smallest (left id, right id)). Entries go stale when a count
    # changes; each change pushes a fresh entry, and a popped entry counts only if still exact.
    def entry(pair: tuple[int, int]) -> tuple[int, int, int]:
        return (-pair_counts[pair], *pair)

    heap = [entry(pair) for pair in pair_counts]
    heapq.heapify(heap)
    while len(tokens) < vocab_size and heap:
        negative_count, left, right = heapq.heappop(heap)
        best = (left, right)
        if pair_counts.get(best) != -negative_count:
            continue  # stale
        # The right piece is always a continuation ("##x"): joined, it keeps the left's form.
        merged = tokens[left] + tokens[right].removeprefix(PREFIX)
        new = ids.get(merged)
        # Two merges could spell one token ("a"+"##bc", "ab"+"##c"): reuse its id, as
        # `tokenizers` does (not seen in practice under one global merge order; kept as a guard).
        if new is None:
            new = ids[merged] = len(tokens)
            tokens.append(merged)
        changed: dict[tuple[int, int], int] = {}
        # Each affected word: the difference between its pairs before and after the merge.
        for index in where.pop(best):
            seq, freq = seqs[index], freqs[index]
            out = _merge_pair(seq, left, right, new)
            old_pairs = Counter(zip(seq, seq[1:], strict=False))
            new_pairs = Counter(zip(out, out[1:], strict=False))
            for pair in old_pairs.keys() | new_pairs.keys():
                delta = new_pairs[pair] - old_pairs[pair]
                if delta:
                    changed[pair] = changed.get(pair, 0) + delta * freq
                if not new_pairs[pair]:
                    where.get(pair, set()).discard(index)
                else:
                    where.setdefault(pair, set()).add(index)
            seqs[index] = out
        for pair, delta in changed.items():
            count = pair_counts.get(pair, 0) + delta
            if count > 0:
                pair_counts[pair] = count
                heapq.heappush(heap, entry(pair))
            else:
                pair_counts.pop(pair, None)
                where.pop(pair, None)
    return tokens


def _merge_pair(seq: list[int], left: int, right: int, new: int) -> list[int]:
    """`seq` with every non-overlapping (left, right), scanned left to right, replaced by `new`."""
    out: list[int] = []
    i = 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == left and seq[i + 1] == right:
            out.append(new)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def list_tokenizers(output: str, s3: S3Config | None = None) -> list[dict[str, Any]]:
    """meta.json of every saved tokenizer under `<output>/text/`, with its `uri`."""
    return versions.list_versions(Layout(output).text, META_FILE, s3)


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
    meta = versions.newest(
        list_tokenizers(output, s3),
        source=source,
        lowercase=lowercase,
        requested_vocab_size=requested_vocab_size,
    )
    return meta["uri"] if meta is not None else None
