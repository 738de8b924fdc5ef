"""A tiny synthetic token corpus with learnable structure, written through TOKENS_SCHEMA.

Each video has a topic (a few visual words); each segment shows some of them, and its text
ids are a fixed function of its video tokens. So masked text is predictable from the video,
masked video from the text, and a misaligned pair is detectable: loss visibly falls.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from videobert import storage
from videobert.tables import TOKENS_SCHEMA, Layout

TEXT_VOCAB = 40
NUM_VISUAL = 16  # k=4, depth=2
CODEBOOK_VERSION = "cb-synthetic"
TOKENIZER_VERSION = "tok-synthetic"


def token_table(
    num_videos: int = 24,
    segments: int = 6,
    seed: int = 0,
    codebook_version: str = CODEBOOK_VERSION,
    tokenizer_version: str = TOKENIZER_VERSION,
) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {name: [] for name in TOKENS_SCHEMA.names}
    for v in range(num_videos):
        topic = rng.choice(NUM_VISUAL, size=4, replace=False)
        for s in range(segments):
            video = rng.choice(topic, size=int(rng.integers(6, 12))).astype(np.int32)
            # text: one word per distinct visual word, in order of first appearance, then a stop word
            seen = list(dict.fromkeys(video.tolist()))
            text = [5 + w for w in seen] + [2]
            rows["video_id"].append(f"video{v:03d}")
            rows["segment_index"].append(s)
            rows["start_s"].append(1.5 * s)
            rows["end_s"].append(1.5 * (s + 1))
            rows["text"].append(" ".join(f"w{t}" for t in text))
            rows["text_ids"].append(text)
            rows["video_tokens"].append(video.tolist())
            rows["codebook_version"].append(codebook_version)
            rows["tokenizer_version"].append(tokenizer_version)
    return pa.table(rows, schema=TOKENS_SCHEMA)


def vocab_uri(output: str) -> str:
    """The corpus's vocab file: a config selects the corpus's tokenizer with `text.vocab=` it."""
    return storage.join(output, "corpus-vocab.txt")


def write_corpus(output: str, shards: int = 2, **kwargs) -> str:
    """A saved tokenizer (TEXT_VOCAB tokens, from the vocab file at `vocab_uri`) and codebook
    (k=4, depth=2) under `output`, and the corpus as `shards` Parquet files under
    tokens/<codebook>-<tokenizer>/; returns that dir."""
    from videobert.codebook import HierarchicalCodebook
    from videobert.text_tokenizer import TextTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += [f"w{i}" for i in range(TEXT_VOCAB - len(words))]
    storage.write_bytes(vocab_uri(output), ("\n".join(words) + "\n").encode())
    tokenizer = TextTokenizer.from_vocab_file(vocab_uri(output))
    assert tokenizer.vocab_size == TEXT_VOCAB
    tokenizer.save_to_output(output)
    features = np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32)
    codebook = HierarchicalCodebook.fit(features, k=4, depth=2, iterations=5, device="cpu")
    assert codebook.vocab_size == NUM_VISUAL
    codebook.save_to_output(output)
    table = token_table(codebook_version=codebook.version, tokenizer_version=tokenizer.version, **kwargs)
    directory = Layout(output).tokens(codebook.version, tokenizer.version)
    step = -(-table.num_rows // shards)
    for i in range(shards):
        storage.write_parquet(table.slice(i * step, step), storage.join(directory, f"part-{i:05d}.parquet"))
    return directory
