"""WordPiece tokenizer: training, vocab files, versions, save/load locally and over S3."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import decoders

from videobert.text_tokenizer import SPECIAL_TOKENS, TextTokenizer, latest_tokenizer, train_wordpiece_vocab

CORPUS = [
    "Crack the eggs into a bowl.",
    "Whisk the eggs with a fork.",
    "Heat the pan and add the butter.",
    "Pour the eggs into the hot pan.",
    "Fold the omelette and serve it.",
] * 5


def test_train_lowercases_and_encodes_without_specials():
    tokenizer = TextTokenizer.train(CORPUS, vocab_size=120)
    assert tokenizer.vocab[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    assert tokenizer.vocab_size == len(tokenizer.vocab) <= 120
    ids = tokenizer.encode("WHISK the Eggs")
    assert ids == tokenizer.encode("whisk the eggs")
    pieces = [tokenizer.vocab[i] for i in ids]
    assert "".join(p.removeprefix("##") for p in pieces) == "whisktheeggs"
    assert not set(pieces) & set(SPECIAL_TOKENS)
    assert tokenizer.encode("zzz") == [tokenizer.vocab.index("[UNK]")]  # z never seen


def test_version_is_content_hash(tmp_path):
    # The version hashes the vocabulary: the same vocabulary (rebuilt from its vocab.txt) gives
    # the same version whatever produced it, and any change to it gives another.
    first = TextTokenizer.train(CORPUS, vocab_size=120)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(first.vocab) + "\n")
    assert TextTokenizer.from_vocab_file(str(vocab)).version == first.version
    assert TextTokenizer.from_vocab_file(str(vocab), lowercase=False).version != first.version
    vocab.write_text("\n".join(first.vocab[:-1]) + "\n")
    assert TextTokenizer.from_vocab_file(str(vocab)).version != first.version


def test_from_vocab_file_keeps_line_numbers_as_ids(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL_TOKENS + ["the", "egg", "##s", "pan", ","]) + "\n")
    tokenizer = TextTokenizer.from_vocab_file(str(vocab))
    assert tokenizer.encode("The eggs, pan") == [5, 6, 7, 9, 8]
    assert tokenizer.vocab == SPECIAL_TOKENS + ["the", "egg", "##s", "pan", ","]
    bad = tmp_path / "bad.txt"
    bad.write_text("the\negg\n")
    with pytest.raises(ValueError, match=r"\[UNK\]"):
        TextTokenizer.from_vocab_file(str(bad))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_save_load_and_latest(where, tmp_path, request):
    output = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket") + "/exp"
    tokenizer = TextTokenizer.train(CORPUS, vocab_size=100)
    assert latest_tokenizer(output) is None
    uri = tokenizer.save_to_output(output)
    assert uri.endswith(tokenizer.version)
    loaded = TextTokenizer.load(uri)
    assert loaded.version == tokenizer.version and loaded.vocab == tokenizer.vocab
    assert loaded.encode("serve the omelette") == tokenizer.encode("serve the omelette")
    assert latest_tokenizer(output, source="trained", requested_vocab_size=100) == uri
    assert latest_tokenizer(output, requested_vocab_size=200) is None
    # vocab.txt written beside it rebuilds the same tokenizer
    rebuilt = TextTokenizer.from_vocab_file(uri + "/vocab.txt")
    assert rebuilt.version == tokenizer.version


def _tutorial_sentences(n: int = 400) -> list[str]:
    """Many equally frequent pairs: the corpus on which `tokenizers`' trainer varied per process."""
    rng = random.Random(1)
    verbs = ["rotate", "show", "paint", "cut", "fold", "stack", "glue", "measure", "drill", "sand"]
    colors = ["red", "blue", "green", "yellow", "black", "white"]
    objects = ["cube", "box", "board", "plank", "bottle", "table", "chair", "frame"]
    fillers = [
        "thanks for watching!",
        "you can do this at home with simple tools.",
        "don't forget to subscribe.",
    ]
    return [
        rng.choice(fillers)
        if rng.random() < 0.3
        else f"now let me show you how to {rng.choice(verbs)} the {rng.choice(colors)} {rng.choice(objects)}."
        for _ in range(n)
    ]


_TRAIN_IN_CHILD = """
import json, sys
from videobert.text_tokenizer import TextTokenizer
tokenizer = TextTokenizer.train(json.load(sys.stdin), vocab_size=400)
print(json.dumps({"version": tokenizer.version, "vocab": tokenizer.vocab}))
"""


def test_training_is_deterministic_across_processes():
    # Separate interpreters with different hash seeds: string hashing, and with it set and dict
    # layouts, differ between them, as they do between a killed run and its rerun.
    sentences = _tutorial_sentences()
    results = []
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", _TRAIN_IN_CHILD],
            input=json.dumps(sentences),
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        results.append(json.loads(done.stdout))
    here = TextTokenizer.train(sentences, vocab_size=400)
    assert results[0] == results[1] == {"version": here.version, "vocab": here.vocab}
    # a function of the sentences, not of their order
    assert TextTokenizer.train(sentences[::-1], vocab_size=400).version == here.version


def test_frequent_words_become_tokens_and_rare_words_split():
    frequent = ["whisk", "butter", "omelette", "pan"]
    rare = ["skillet", "spatula", "garnish"]
    sentences = [f"{w} {w}." for w in frequent] * 50 + [f"{w}." for w in rare]
    alphabet = set("".join(frequent + rare) + ".")
    # Room for the specials, the alphabet and the 18 merges the frequent words need (their pairs
    # count >= 100, a rare word's count at most a few), plus two more.
    tokenizer = TextTokenizer.train(sentences, vocab_size=len(SPECIAL_TOKENS) + 2 * len(alphabet) + 20)
    for word in frequent:
        assert tokenizer.encode(word) == [tokenizer.vocab.index(word)]
    for word in rare:
        pieces = [tokenizer.vocab[i] for i in tokenizer.encode(word)]
        assert len(pieces) > 1 and "[UNK]" not in pieces
        assert decoders.WordPiece().decode(pieces) == word


def test_vocab_size_is_respected():
    sentences = _tutorial_sentences()
    everything = TextTokenizer.train(sentences, vocab_size=10_000)  # merges run out first
    assert everything.vocab_size < 10_000
    split = everything.tokenizer
    words = {
        w
        for s in sentences
        for w, _ in split.pre_tokenizer.pre_tokenize_str(split.normalizer.normalize_str(s))
    }
    assert {"rotate", "subscribe", "watching"} <= words <= set(everything.vocab)
    for size in (60, 100, everything.vocab_size):
        tokenizer = TextTokenizer.train(sentences, vocab_size=size)
        assert tokenizer.vocab_size == len(tokenizer.vocab) == size
        assert tokenizer.vocab == everything.vocab[:size]  # merges come in the same order
    # an alphabet too big for vocab_size keeps its most frequent characters
    # ("c" and "d" go; words holding them get no merges), then one merge fills the last slot
    small = train_wordpiece_vocab({"aaab": 3, "cc": 1, "d": 1}, vocab_size=len(SPECIAL_TOKENS) + 5)
    assert small == SPECIAL_TOKENS + ["a", "b", "##a", "##b", "aa"]
    with pytest.raises(ValueError, match="special tokens"):
        train_wordpiece_vocab({"a": 1}, vocab_size=3)


def test_merge_rule_and_tie_break():
    base = SPECIAL_TOKENS + ["a", "b", "c", "d", "##a", "##b", "##c", "##d"]
    # equal counts: the pair with the smaller (left id, right id) first, word-initial "a" < "c"
    assert train_wordpiece_vocab({"cd": 2, "ab": 2}, len(base) + 2)[len(base) :] == ["ab", "cd"]
    # a continuation pair makes a continuation token; counts weigh words by frequency
    assert train_wordpiece_vocab({"abb": 1, "cbb": 1, "dbb": 1}, len(base) + 2)[len(base) :] == [
        "##bb",
        "abb",
    ]


def _reference_vocab(word_counts: dict[str, int], vocab_size: int) -> list[str]:
    """The same rules, recounting every pair at every step: slow and obviously right."""
    chars = sorted({c for w in word_counts for c in w})
    tokens = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    ids = {t: i for i, t in enumerate(tokens)}
    pieces = {w: [w[0], *("##" + c for c in w[1:])] for w in word_counts}
    while len(tokens) < vocab_size:
        counts: Counter[tuple[str, str]] = Counter()
        for word, seq in pieces.items():
            for pair in zip(seq, seq[1:], strict=False):
                counts[pair] += word_counts[word]
        if not counts:
            break
        left, right = min(counts, key=lambda p: (-counts[p], ids[p[0]], ids[p[1]]))
        merged = left + right.removeprefix("##")
        if merged not in ids:
            ids[merged] = len(tokens)
            tokens.append(merged)
        for word, seq in pieces.items():
            out, i = [], 0
            while i < len(seq):
                if seq[i : i + 2] == [left, right]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            pieces[word] = out
    return tokens


@pytest.mark.parametrize("seed", range(5))
def test_incremental_counts_match_a_full_recount(seed):
    # Few letters, repeated runs ("aaaa": overlapping pairs) and many ties stress the pair
    # counts and word sets kept up to date merge by merge.
    rng = random.Random(seed)
    words = {
        "".join(rng.choice("aabbc") for _ in range(rng.randint(1, 8))): rng.randint(1, 4) for _ in range(300)
    }
    vocab_size = len(SPECIAL_TOKENS) + 6 + 150
    assert train_wordpiece_vocab(words, vocab_size) == _reference_vocab(words, vocab_size)
