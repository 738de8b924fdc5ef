"""Dropout on CPU: videobert/dropout.py against torch's own dropout, side by side, alternating,
in one process (best round counts).

1. The op: `dropout(x, p)` against `F.dropout(x, p)` on the demo's largest dropout inputs (the
   captioner's feed-forward [128, 14, 512], pretraining's attention probabilities [128, 2, 64, 64]).
2. Whole training steps of the demo's two models, each with our masks against the same model
   with torch's (`nn.Dropout`, and SDPA's own attention dropout for VideoBERT): the paper's
   captioner (2 layers, hidden 128, dropout 0.4, batch 128, 12-token captions) and the `debug`
   VideoBERT (hidden 64, 2 layers, dropout 0.1, batch 128 x 64 tokens, masked-LM loss).

    python benchmarks/bench_dropout.py [--steps 20] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import videobert.model as model_module
from videobert.captioning import CaptionModel, CaptionVocab, caption_loss, caption_tensor
from videobert.dropout import dropout, use_fast_dropout
from videobert.model import VideoBert, VideoBertConfig

OUR_ATTENTION = model_module.attention  # the peer swaps in SDPA's own dropout


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, p: float
) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


def captioner_step(ours: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    features = torch.randn(128, 128 + 128 + 1024)
    words = ["slide", "lift", "spin", "circle", "square", "star"]
    captions = [f"now let me show you how to {words[i % 3]} the {words[3 + i % 3]}." for i in range(128)]
    vocab = CaptionVocab.build(captions)
    tokens = caption_tensor(vocab, captions, 20)
    model = CaptionModel([128, 128, 1024], len(vocab))
    model = model if ours else use_fast_dropout(model, fast=False)
    model.standardise_with(features)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()

    def step() -> None:
        loss = caption_loss(model, features, tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def videobert_step(ours: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    vocab = 6 + 400 + 16
    config = VideoBertConfig(
        vocab_size=vocab, max_positions=64, hidden=64, layers=2, heads=2, intermediate=256
    )
    model = VideoBert(config)
    model = model if ours else use_fast_dropout(model, fast=False)
    ids = torch.randint(6, vocab, (128, 64))
    types = torch.randint(0, 2, (128, 64))
    seq_ids = torch.ones(128, 64, dtype=torch.long)
    seq_ids[:, 40:] = 2  # two packed examples a row, as the demo's batches
    positions = torch.nonzero((torch.rand(128, 64) < 0.15).reshape(-1)).squeeze(-1)
    targets = ids.reshape(-1)[positions]
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)

    def step() -> None:
        model_module.attention = OUR_ATTENTION if ours else sdpa
        out = model(ids, types, seq_ids=seq_ids, mlm_positions=positions)
        F.cross_entropy(out["mlm_logits"], targets).backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def best_seconds(
    pairs: dict[str, tuple[Callable[[], None], Callable[[], None]]], steps: int, rounds: int
) -> None:
    for name, (ours, theirs) in pairs.items():
        for fn in (ours, theirs):
            fn()  # warm-up
        best = {"ours": float("inf"), "torch": float("inf")}
        for _ in range(rounds):
            for side, fn in (("ours", ours), ("torch", theirs)):
                started = time.perf_counter()
                for _ in range(steps):
                    fn()
                best[side] = min(best[side], (time.perf_counter() - started) / steps)
        print(
            f"{name:<44} ours {best['ours'] * 1e3:8.2f} ms   torch {best['torch'] * 1e3:8.2f} ms   "
            f"ratio {best['ours'] / best['torch']:.2f}"
        )
    model_module.attention = OUR_ATTENTION


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    feed_forward = torch.randn(128, 14, 512)
    probabilities = torch.rand(128, 2, 64, 64)
    ops = {
        "dropout 0.4 on [128, 14, 512]": (
            lambda: dropout(feed_forward, 0.4),
            lambda: F.dropout(feed_forward, 0.4),
        ),
        "dropout 0.1 on [128, 2, 64, 64]": (
            lambda: dropout(probabilities, 0.1),
            lambda: F.dropout(probabilities, 0.1),
        ),
    }
    best_seconds(ops, args.steps * 5, args.rounds)
    best_seconds(
        {
            "captioner training step (batch 128)": (captioner_step(True), captioner_step(False)),
            "debug VideoBERT training step (128 x 64)": (videobert_step(True), videobert_step(False)),
        },
        args.steps,
        args.rounds,
    )


if __name__ == "__main__":
    main()
