"""A contact sheet of visual words: how people check that a codebook means something.

One row per word (the most populated words of the sample, up to `words`), showing the middle
frame of the `per_word` sample clips nearest to the word's centroid, nearest first. A frame
that cannot be decoded is drawn as a grey tile with an X, so one bad video never hides the
sheet.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageDraw

from videobert import storage
from videobert.codebook import GALLERY_FILE, HierarchicalCodebook
from videobert.config import ExperimentConfig

log = logging.getLogger(__name__)

LABEL_WIDTH = 64


@dataclass(frozen=True)
class ClipRef:
    """Where a sampled feature came from: its video and the clip's time span."""

    source_uri: str
    start_s: float
    end_s: float


def nearest_clips(
    codebook: HierarchicalCodebook, features: np.ndarray, words: int, per_word: int
) -> list[tuple[int, list[int]]]:
    """[(word, [row indices of the nearest sample features])] for the most populated words."""
    assigned = codebook.assign(features)
    counts = np.bincount(assigned, minlength=codebook.vocab_size)
    # Most populated first; ties by word id so the choice is deterministic.
    chosen = sorted(np.nonzero(counts)[0].tolist(), key=lambda w: (-counts[w], w))[:words]
    leaves = codebook.leaf_centroids.to(torch.float32)
    picks = []
    for word in chosen:
        rows = np.nonzero(assigned == word)[0]
        member = torch.as_tensor(features[rows]).to(torch.float32)
        distance = ((member - leaves[word]) ** 2).sum(1).numpy()
        picks.append((word, rows[np.argsort(distance, kind="stable")[:per_word]].tolist()))
    return picks


def _tile(frame: np.ndarray | None, size: int) -> Image.Image:
    if frame is None:
        tile = Image.new("RGB", (size, size), (96, 96, 96))
        draw = ImageDraw.Draw(tile)
        draw.line((0, 0, size, size), fill=(160, 32, 32), width=2)
        draw.line((0, size, size, 0), fill=(160, 32, 32), width=2)
        return tile
    return Image.fromarray(frame).convert("RGB").resize((size, size))


def contact_sheet(
    picks: list[tuple[int, list[int]]],
    clip_refs: list[ClipRef],
    read_frame: Callable[[str, float, int], np.ndarray],
    per_word: int,
    tile: int = 96,
) -> Image.Image:
    """Draw the sheet; `read_frame(uri, time_s, size)` returns an (size, size, 3) uint8 frame."""
    sheet = Image.new("RGB", (LABEL_WIDTH + per_word * tile, max(1, len(picks)) * tile), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    failures: list[str] = []
    for row, (word, indices) in enumerate(picks):
        draw.text((4, row * tile + tile // 2 - 6), f"#{word}", fill=(0, 0, 0))
        for column, index in enumerate(indices):
            ref = clip_refs[index]
            try:
                frame = read_frame(ref.source_uri, (ref.start_s + ref.end_s) / 2, tile)
            except Exception as error:  # an unreadable frame must not hide the rest of the sheet
                failures.append(f"{ref.source_uri} at {ref.start_s:.2f} s: {error}")
                frame = None
            sheet.paste(_tile(frame, tile), (LABEL_WIDTH + column * tile, row * tile))
    if failures:
        log.warning("gallery: %d frames could not be read, e.g. %s", len(failures), failures[0])
    return sheet


def gallery_png(
    codebook: HierarchicalCodebook,
    features: np.ndarray,
    clip_refs: list[ClipRef],
    read_frame: Callable[[str, float, int], np.ndarray],
    words: int = 16,
    per_word: int = 6,
    tile: int = 96,
) -> bytes:
    """PNG bytes of the contact sheet for `words` visual words."""
    if len(clip_refs) != len(features):
        raise ValueError("one clip reference per feature row is needed")
    picks = nearest_clips(codebook, features, words, per_word)
    image = contact_sheet(picks, clip_refs, read_frame, per_word, tile)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_gallery(
    config: ExperimentConfig,
    codebook: HierarchicalCodebook,
    sample: pa.Table,
    manifest: pa.Table,
    features: np.ndarray,
    directory: str,
) -> bytes:
    """The gallery of a fitted codebook's words (a frame of the sampled clips nearest to each),
    written beside the codebook in `directory`; returns the PNG."""
    from videobert.decode import read_frame

    source = dict(
        zip(manifest.column("video_id").to_pylist(), manifest.column("source_uri").to_pylist(), strict=True)
    )
    refs = [
        ClipRef(source.get(v, ""), s, e)
        for v, s, e in zip(
            sample.column("video_id").to_pylist(),
            sample.column("start_s").to_pylist(),
            sample.column("end_s").to_pylist(),
            strict=True,
        )
    ]
    png = gallery_png(
        codebook,
        features,
        refs,
        lambda uri, time_s, size: read_frame(uri, time_s, size, config.s3, decode=config.decode),
        words=config.codebook.gallery_words,
    )
    storage.write_bytes(storage.join(directory, GALLERY_FILE), png, config.s3)
    return png
