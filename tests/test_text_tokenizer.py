"""WordPiece tokenizer: training, vocab files, versions, save/load locally and over S3."""

from __future__ import annotations

import pytest

from videobert.text_tokenizer import SPECIAL_TOKENS, TextTokenizer, latest_tokenizer

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
    # `tokenizers` breaks ties between equally frequent merges differently per process, so a
    # retrain may differ: the version hashes the vocabulary, and the same vocabulary (rebuilt
    # from its vocab.txt) gives the same version whatever produced it.
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
