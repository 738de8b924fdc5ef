"""Named Transformer sizes, without torch, so the config can check `model.size` at load."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSize:
    """The shape of one named size (names follow BERT's config)."""

    hidden: int
    """Hidden size."""
    layers: int
    """Transformer layers."""
    heads: int
    """Attention heads."""
    intermediate: int
    """Feed-forward inner size."""
    max_positions: int | None = None
    """Longest sequence this size supports; None: any (positions are learned at model.max_seq_len)."""

    def shape(self) -> dict[str, int]:
        """The keyword arguments of the Transformer's shape (max_positions is set per model)."""
        return dict(hidden=self.hidden, layers=self.layers, heads=self.heads, intermediate=self.intermediate)


MODEL_SIZES: dict[str, ModelSize] = {
    "debug": ModelSize(hidden=64, layers=2, heads=2, intermediate=256),
    "base": ModelSize(hidden=768, layers=12, heads=12, intermediate=3072),
    "large": ModelSize(hidden=1024, layers=24, heads=16, intermediate=4096),  # the paper's size
}
