"""videobert/dropout.py: the CPU masks keep 1 - p of the elements in every lane, reproducibly,
and dropout / attention compute torch's maths with them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from videobert.captioning import CaptionModel
from videobert.dropout import Dropout, attention, dropout, keep_mask, use_fast_dropout
from videobert.model import VideoBert, VideoBertConfig


@pytest.mark.parametrize("p", [0.1, 0.4, 0.9])
def test_masks_keep_one_minus_p_in_every_lane(p: float) -> None:
    torch.manual_seed(0)
    mask = keep_mask((1024, 1024), p)
    assert mask.dtype == torch.bool and mask.shape == (1024, 1024)
    # Four uniforms come from each 64-bit draw: each lane (position mod 4) must be uniform too,
    # which a draw with its top bit always clear (torch's default random_ range) is not.
    lanes = mask.view(-1, 4).float().mean(0)
    assert torch.allclose(lanes, torch.full((4,), 1 - p), atol=0.005), lanes
    # No run structure between neighbours: the two-element pattern rates are independent.
    flat = mask.view(-1)
    both = (flat[:-1] & flat[1:]).float().mean()
    assert abs(float(both) - (1 - p) ** 2) < 0.005


def test_masks_follow_torch_seed_and_odd_sizes() -> None:
    torch.manual_seed(3)
    first = keep_mask((7, 5, 3), 0.5)
    torch.manual_seed(3)
    again = keep_mask((7, 5, 3), 0.5)
    other = keep_mask((7, 5, 3), 0.5)
    assert first.shape == (7, 5, 3)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert keep_mask((0, 4), 0.5).shape == (0, 4)


def test_dropout_scales_kept_elements_and_passes_gradients() -> None:
    x = torch.randn(64, 256, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.25)
    kept = y != 0
    assert 0.70 < kept.float().mean() < 0.80
    assert torch.allclose(y[kept], x[kept] / 0.75)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.75)
    assert torch.equal(dropout(x, 0.25, training=False), x)
    assert torch.equal(dropout(x, 0.0), x)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    module = Dropout(0.25)
    assert torch.equal(module.eval()(x), x) and module.train()(x).ne(0).float().mean() < 0.80


def test_attention_matches_sdpa_and_drops_probabilities() -> None:
    torch.manual_seed(2)
    q, k, v = (torch.randn(3, 2, 9, 8) for _ in range(3))
    seq_ids = torch.tensor([[1] * 5 + [2] * 4, [1] * 9, [1] * 6 + [0] * 3])
    mask = (seq_ids[:, :, None] == seq_ids[:, None, :]).unsqueeze(1)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # A dropout rate under the masks' resolution keeps everything: the maths alone is compared.
    assert torch.allclose(attention(q, k, v, mask, 1e-9), expected, atol=1e-5)
    assert torch.allclose(attention(q, k, v, None, 1e-9), F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    torch.manual_seed(5)
    dropped = attention(q, k, v, mask, 0.5)
    torch.manual_seed(5)
    scores = (q @ k.transpose(-2, -1) / 8**0.5).masked_fill(~mask, float("-inf")).softmax(-1)
    manual = (scores * keep_mask(scores.shape, 0.5) / 0.5) @ v
    assert torch.allclose(dropped, manual, atol=1e-5) and not torch.allclose(dropped, expected, atol=1e-3)


def test_models_use_the_fast_masks_with_unchanged_weights() -> None:
    layer = nn.TransformerDecoderLayer(16, 2, 32, 0.3, batch_first=True)
    names = set(layer.state_dict())
    use_fast_dropout(layer)
    assert set(layer.state_dict()) == names
    assert [type(m) for m in layer.modules() if isinstance(m, nn.Dropout)] == [Dropout] * 4
    assert layer.dropout1.p == 0.3
    use_fast_dropout(layer, fast=False)  # the benchmark's peer: torch's own again
    assert [type(m) for m in layer.modules() if isinstance(m, nn.Dropout)] == [nn.Dropout] * 4
    for model in (
        CaptionModel([8, 4], 10, hidden=16, heads=2),
        VideoBert(
            VideoBertConfig(vocab_size=20, max_positions=16, hidden=16, layers=1, heads=2, intermediate=32)
        ),
    ):
        dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        assert dropouts and all(type(m) is Dropout for m in dropouts)
