"""What cutting a captioner batch to its longest caption saves: `captioning.caption_loss`
against the same loss over the whole padded width (`max_caption_words + 2` columns, as before
the cut), same model, data and seeds, side by side, alternating, in one process.

The paper's captioner (2 layers, hidden 128, dropout 0.4, Adam 1e-3) on "VideoBERT + S3D"-shaped
features (2 x 128 + 1024) and the demo's captions ("now let me show you how to <verb> the
<object>.": 10 words, 12 tokens of 22). One torch thread unless OMP_NUM_THREADS says otherwise.

    python benchmarks/bench_caption_padding.py [--steps 50] [--segments 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from videobert.captioning import PAD, CaptionModel, CaptionVocab, caption_loss, caption_tensor


def padded_width_loss(model: CaptionModel, features: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """The loss as it was computed before the cut: every padded column goes through the model."""
    logits = model(features, captions[:, :-1])
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), captions[:, 1:].reshape(-1), ignore_index=PAD
    )


def seconds(loss_fn, features: torch.Tensor, captions: torch.Tensor, vocab_size: int, steps: int) -> float:
    torch.manual_seed(0)
    model = CaptionModel([128, 128, 1024], vocab_size)
    model.standardise_with(features)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    started = time.perf_counter()
    for _ in range(steps):
        loss = loss_fn(model, features, captions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--segments", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    verbs, objects = ["slide", "lift", "spin"], ["circle", "square", "star", "lemon"]
    texts = [
        f"now let me show you how to {verbs[i % 3]} the {objects[(i // 3) % 4]}."
        for i in range(args.segments)
    ]
    vocab = CaptionVocab.build(texts)
    captions = caption_tensor(vocab, texts, 20)
    features = torch.randn(args.segments, 128 + 128 + 1024, generator=torch.Generator().manual_seed(0))
    ours, padded = [], []
    for _ in range(args.rounds):
        padded.append(seconds(padded_width_loss, features, captions, len(vocab), args.steps))
        ours.append(seconds(caption_loss, features, captions, len(vocab), args.steps))
    print(
        f"{args.steps} steps, batch {args.segments}, {torch.get_num_threads()} thread(s); load {os.getloadavg()[0]:.2f}"
    )
    print(f"{'':28}{'cut (ours)':>12}{'padded':>10}{'ratio':>8}")
    best_ours, best_padded = min(ours), min(padded)
    print(
        f"{'s per run, best of ' + str(args.rounds):28}{best_ours:12.2f}{best_padded:10.2f}{best_ours / best_padded:8.2f}"
    )


if __name__ == "__main__":
    main()
