"""Video embeddings from a trained VideoBERT: a video's visual words -> pooled hidden states.

A video is fed as the training's video-only input, `[CLS] video [SEP]` with token type video
(`examples.build_sequence`), in chunks of at most `max_len` tokens: a video longer than
`max_len - 2` words is split into ceil(n / (max_len - 2)) chunks of near-equal length, so no
chunk is a short remainder with little context. Per video:

- `embedding`: the mean of the last hidden states over every video token of every chunk
  (token-weighted: with one chunk it is simply the mean over the video tokens);
- `cls_embedding`: the mean over chunks of the last hidden state at `[CLS]`.

Chunks of many videos run as padded batches, shortest with shortest; padding is masked out of
attention (`seq_ids`), so a video's embedding does not depend on its batch mates.
Ray-free: pipelines/embed.py maps this over actors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from videobert.examples import VIDEO, build_sequence
from videobert.model import JointVocab, VideoBert


def chunk_words(words: np.ndarray, max_len: int) -> list[np.ndarray]:
    """A video's visual words in near-equal chunks that fit `[CLS] chunk [SEP]` in `max_len` tokens."""
    budget = max_len - 2
    if budget < 1:
        raise ValueError(f"max_len {max_len} leaves no room for video tokens")
    if len(words) == 0:
        raise ValueError("a video needs at least one visual word")
    return np.array_split(np.asarray(words, np.int64), -(-len(words) // budget))


@dataclass
class VideoEmbeddings:
    """Per video, in input order."""

    embedding: np.ndarray  # [N, H] float32
    cls_embedding: np.ndarray  # [N, H] float32
    num_chunks: np.ndarray  # [N] int64


@torch.no_grad()
def embed_videos(
    model: VideoBert,
    vocab: JointVocab,
    videos: Sequence[np.ndarray],
    max_len: int,
    chunks_per_pass: int = 64,
) -> VideoEmbeddings:
    """Embed each video (its codebook ids in clip order) with `model` (see the module doc)."""
    if max_len > model.config.max_positions:
        raise ValueError(f"max_len {max_len} exceeds the model's max_positions {model.config.max_positions}")
    no_text = np.empty(0, np.int64)
    chunks: list[tuple[int, np.ndarray, np.ndarray]] = []  # (video, ids, token types)
    for video, words in enumerate(videos):
        if len(words) and not 0 <= int(np.min(words)) <= int(np.max(words)) < vocab.num_visual:
            raise ValueError(f"visual word outside the model's {vocab.num_visual} words")
        for chunk in chunk_words(words, max_len):
            chunks.append((video, *build_sequence(vocab, VIDEO, no_text, chunk, max_len)))
    device = next(model.parameters()).device
    hidden_size = model.config.hidden
    token_sums = torch.zeros(len(videos), hidden_size, dtype=torch.float64, device=device)
    cls_sums = torch.zeros_like(token_sums)
    tokens = torch.zeros(len(videos), dtype=torch.float64, device=device)
    num_chunks = torch.zeros_like(tokens)
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i][1]))  # less padding per pass
    for start in range(0, len(order), chunks_per_pass):
        part = [chunks[i] for i in order[start : start + chunks_per_pass]]
        lengths = [len(ids) for _, ids, _ in part]
        width = max(lengths)
        ids = np.zeros((len(part), width), np.int64)
        types = np.zeros_like(ids)
        seq_ids = np.zeros_like(ids)  # 1 = real token, 0 = padding
        video_tokens = np.zeros((len(part), width), np.float64)  # 1 between [CLS] and [SEP]
        for row, (_, chunk_ids, chunk_types) in enumerate(part):
            n = len(chunk_ids)
            ids[row, :n], types[row, :n], seq_ids[row, :n] = chunk_ids, chunk_types, 1
            video_tokens[row, 1 : n - 1] = 1.0
        # No padding in this pass: no mask, which lets SDPA take its fastest kernel.
        mask = None if min(lengths) == width else torch.as_tensor(seq_ids, device=device)
        hidden = model.encode(
            torch.as_tensor(ids, device=device), torch.as_tensor(types, device=device), seq_ids=mask
        ).double()  # [R, T, H]
        weights = torch.as_tensor(video_tokens, device=device)  # [R, T]
        owner = torch.as_tensor([video for video, _, _ in part], device=device)  # [R]
        token_sums.index_add_(0, owner, (hidden * weights.unsqueeze(-1)).sum(1))  # [R, T, H] -> [R, H]
        cls_sums.index_add_(0, owner, hidden[:, 0])
        tokens.index_add_(0, owner, weights.sum(1))
        num_chunks.index_add_(0, owner, torch.ones_like(owner, dtype=torch.float64))
    return VideoEmbeddings(
        embedding=(token_sums / tokens.unsqueeze(-1)).float().cpu().numpy(),
        cls_embedding=(cls_sums / num_chunks.unsqueeze(-1)).float().cpu().numpy(),
        num_chunks=num_chunks.cpu().numpy().astype(np.int64),
    )
