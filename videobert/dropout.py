"""Dropout with a faster random mask on CPU, for the VideoBERT Transformer and the captioner.

On CPU, torch's dropout draws its mask with `bernoulli_`, one Mersenne-Twister float per
element: about 20 ns an element, a quarter to a third of a training step of the demo's small
models on 2 cores (`benchmarks/bench_dropout.py`, BENCHMARKS.md). Here one 64-bit draw from the
same generator gives four 16-bit uniforms, and an element is kept when its uniform is at or
above p (p resolved to 1/65,536). The maths is torch's: kept elements are scaled by 1/(1-p),
`torch.manual_seed` makes the masks reproducible. On other devices (CUDA's Philox dropout is
already fast) and out of training, everything is torch's own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LANES = 4  # int16 uniforms per int64 draw


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A CPU bool mask of `shape`, each element True with probability 1 - p."""
    count = math.prod(shape)
    # random_(from, to) over the whole int64 range: its default range leaves the top bit clear.
    draws = torch.empty((count + _LANES - 1) // _LANES, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    uniforms = draws.view(torch.int16)[:count]  # each uniform over [-32768, 32767]
    return (uniforms >= round(p * 65536) - 32768).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with `keep_mask` on CPU."""
    if not training or p == 0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    if p == 1:
        return x * 0
    return x * keep_mask(x.shape, p).to(x.dtype).mul_(1 / (1 - p))


class Dropout(nn.Dropout):
    """`nn.Dropout` with `keep_mask` on CPU (same parameters-free state, same repr)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)` (a bool
    mask, True = attend). With dropout on CPU it is computed as SDPA's own maths fallback does
    there (scores, softmax, dropout, values), with `dropout` on the probabilities. Every query
    must attend to some key (VideoBERT's masks do: padding attends to padding)."""
    if dropout_p == 0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return dropout(scores.softmax(-1), dropout_p) @ v


def use_fast_dropout(module: nn.Module, fast: bool = True) -> nn.Module:
    """Swap every `nn.Dropout` under `module` (torch's Transformer layers) for `Dropout`, or with
    `fast=False` every `Dropout` back (the benchmark's peer); the state dict does not change.
    `nn.MultiheadAttention`'s own attention dropout stays torch's."""
    old, new = (nn.Dropout, Dropout) if fast else (Dropout, nn.Dropout)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is old:
                setattr(parent, name, new(child.p, child.inplace))
    return module
