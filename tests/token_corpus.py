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


def clip_features(table: pa.Table, dim: int = 1024, seed: int = 0) -> dict[str, pa.Table]:
    """Features tables (extract's FEATURES schema) that fit `table`'s token rows: each segment's
    video tokens become clips spread evenly over its [start_s, end_s), and a clip's feature is
    its visual word's fixed random vector plus noise (so features carry the word)."""
    rng = np.random.default_rng(seed)
    words = rng.standard_normal((NUM_VISUAL, dim)).astype(np.float32)
    out: dict[str, dict[str, list]] = {}
    for vid, start, end, tokens in zip(
        table["video_id"].to_pylist(),
        table["start_s"].to_pylist(),
        table["end_s"].to_pylist(),
        table["video_tokens"].to_pylist(),
        strict=True,
    ):
        cols = out.setdefault(
            vid, {"video_id": [], "clip_index": [], "start_s": [], "end_s": [], "feature": []}
        )
        edges = np.linspace(start, end, len(tokens) + 1)
        for n, word in enumerate(tokens):
            cols["video_id"].append(vid)
            cols["clip_index"].append(len(cols["clip_index"]))
            cols["start_s"].append(float(edges[n]))
            cols["end_s"].append(float(edges[n + 1]))
            feature = words[word] + 0.3 * rng.standard_normal(dim).astype(np.float32)
            cols["feature"].append(feature.astype(np.float16))
    return {vid: features_table_of(cols) for vid, cols in out.items()}


def features_table_of(cols: dict[str, list]) -> pa.Table:
    feats = np.stack(cols.pop("feature")).astype(np.float16)
    feature = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1])
    return pa.table({**cols, "feature": feature})


def row_features(table: pa.Table) -> list[np.ndarray]:
    """Each token row's clip features (`clip_features`), joined as FeatureJoiner joins them."""
    from videobert.token_shards import segment_clip_rows

    tables = clip_features(table)
    out = []
    for vid, start, end in zip(
        table["video_id"].to_pylist(), table["start_s"].to_pylist(), table["end_s"].to_pylist(), strict=True
    ):
        clips = tables[vid]
        starts, ends = clips["start_s"].to_numpy(), clips["end_s"].to_numpy()
        feats = np.stack(clips["feature"].to_numpy(zero_copy_only=False))
        out.append(feats[segment_clip_rows(starts, ends, start, end)])
    return out


def write_features(output: str, table: pa.Table) -> None:
    """`clip_features(table)` as extract's features/<video_id>.parquet under `output`."""
    for vid, features in clip_features(table).items():
        storage.write_parquet(features, Layout(output).features_file(vid))


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
