"""Alignment of sentences with clips: exact segments for hand-made cases."""

from __future__ import annotations

import pytest

from videobert.align import Segment, align_segments
from videobert.transcripts import Cue, Sentence, to_sentences

# Ten 1.5 s clips; clip i has video token 100 + i.
CLIPS = [(i, 1.5 * i, 1.5 * (i + 1)) for i in range(10)]
TOKENS = [100 + i for i in range(10)]


def seg(index, start, end, text, tokens):
    return Segment("v", index, start, end, text, tokens)


def test_no_transcript_is_cut_into_fixed_size_segments():
    assert align_segments("v", CLIPS, TOKENS, None, 4) == [
        seg(0, 0.0, 6.0, "", [100, 101, 102, 103]),
        seg(1, 6.0, 12.0, "", [104, 105, 106, 107]),
        seg(2, 12.0, 15.0, "", [108, 109]),
    ]
    assert align_segments("v", CLIPS, TOKENS, [], 16) == [seg(0, 0.0, 15.0, "", TOKENS)]


def test_clips_in_any_order_are_aligned_by_clip_index():
    shuffled = list(reversed(CLIPS))
    assert align_segments("v", shuffled, list(reversed(TOKENS)), None, 16) == [seg(0, 0.0, 15.0, "", TOKENS)]


def test_sentences_gaps_and_boundaries():
    sentences = [
        Sentence(0.2, 2.9, "crack the eggs."),  # clips 0, 1
        Sentence(3.0, 4.5, "whisk."),  # exactly clip 2: touching clip 3 at 4.5 is no overlap
        Sentence(9.4, 9.4, "now."),  # zero length: the clip holding 9.4 (clip 6)
        Sentence(14.0, 20.0, "serve."),  # past the end: only clip 9
        Sentence(30.0, 31.0, "after the video."),  # overlaps no clip: no segment
    ]
    # Gap with no speech: clips 3, 4, 5 and 7, 8 become video-only segments of <= 2 tokens.
    assert align_segments("v", CLIPS, TOKENS, sentences, 2) == [
        seg(0, 0.2, 2.9, "crack the eggs.", [100, 101]),
        seg(1, 3.0, 4.5, "whisk.", [102]),
        seg(2, 4.5, 7.5, "", [103, 104]),
        seg(3, 7.5, 9.0, "", [105]),
        seg(4, 9.4, 9.4, "now.", [106]),
        seg(5, 10.5, 13.5, "", [107, 108]),
        seg(6, 14.0, 20.0, "serve.", [109]),
    ]


def test_overlapping_sentences_share_clips_in_a_fixed_order():
    sentences = [Sentence(1.0, 4.0, "a long one."), Sentence(1.0, 2.0, "short."), Sentence(2.9, 3.2, "mid.")]
    segments = align_segments("v", CLIPS[:3], TOKENS[:3], sentences, 16)
    assert segments == [
        seg(0, 1.0, 2.0, "short.", [100, 101]),
        seg(1, 1.0, 4.0, "a long one.", [100, 101, 102]),
        seg(2, 2.9, 3.2, "mid.", [101, 102]),
    ]


def test_from_cues_sentence_spanning_cues_and_cue_with_two_sentences():
    cues = [Cue(0.0, 2.0, "Heat the oil in"), Cue(2.0, 4.5, "the pan. Add garlic."), Cue(9.0, 10.0, "Stir.")]
    sentences = to_sentences(cues)
    # "the pan." is 8 of 20 characters of cue 2: ends at 2.0 + 2.5 * 8 / 20 = 3.0.
    assert [(s.start_s, s.end_s) for s in sentences] == [(0.0, 3.0), (3.125, 4.5), (9.0, 10.0)]
    assert align_segments("v", CLIPS[:8], TOKENS[:8], sentences, 16) == [
        seg(0, 0.0, 3.0, "Heat the oil in the pan.", [100, 101]),
        seg(1, 3.125, 4.5, "Add garlic.", [102]),
        seg(2, 4.5, 9.0, "", [103, 104, 105]),
        seg(3, 9.0, 10.0, "Stir.", [106]),
        seg(4, 10.5, 12.0, "", [107]),
    ]


def test_mismatched_tokens_raise():
    with pytest.raises(ValueError, match="video tokens"):
        align_segments("v", CLIPS, TOKENS[:3], None, 4)


def test_alignment_is_linear_in_the_sentences() -> None:
    """An hour of clips under 100,000 short caption sentences (what an 8 MiB auto-caption file
    can hold): each sentence's clips are found by bisection, not by scanning every clip
    (2.4e8 overlap checks, minutes in Python, before)."""
    import time

    clips = [(i, 1.5 * i, 1.5 * (i + 1)) for i in range(2400)]
    sentences = [Sentence(0.036 * i, 0.036 * i + 0.03, "x") for i in range(100_000)]
    started = time.perf_counter()
    segments = align_segments("v", clips, [0] * len(clips), sentences, 16)
    assert time.perf_counter() - started < 5.0
    assert sum(1 for s in segments if s.text) == 100_000
