"""Align narration sentences with visual words: the paper's (sentence, video tokens) segments.

Rules (deterministic, the same for every run):

- A clip is the half-open time span [start_s, end_s). A clip **overlaps** a sentence
  [s, e] when their intersection has positive length: `clip.start_s < e and clip.end_s > s`.
  A zero-length sentence (s == e) overlaps the clip that contains its instant
  (`clip.start_s <= s < clip.end_s`).
- Each sentence becomes one segment with the video tokens of every clip it overlaps, in
  clip order; its times are the sentence's times. A clip on the boundary of two sentences,
  or under two overlapping sentences, goes to both.
- A sentence that overlaps no clip (e.g. narration after the last decoded clip) gives no
  segment: a segment without video is not an alignment.
- Clips that no sentence overlaps (gaps with no speech, or the whole video when there is no
  transcript) form video-only segments (empty text) of at most `segment_tokens` consecutive
  clips; a run of uncovered clips is cut from its first clip. Their times are the first
  clip's start and the last clip's end.
- Segments are ordered by (start_s, end_s, sentence order) and numbered from 0.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from videobert.transcripts import Sentence


@dataclass(frozen=True)
class Segment:
    """One aligned segment of a video: narration text (maybe empty) and its video tokens."""

    video_id: str
    segment_index: int
    start_s: float
    end_s: float
    text: str
    video_tokens: list[int]


def _overlaps(clip_start: float, clip_end: float, start: float, end: float) -> bool:
    if start == end:
        return clip_start <= start < clip_end
    return clip_start < end and clip_end > start


def align_segments(
    video_id: str,
    clips: list[tuple[int, float, float]],
    video_tokens: list[int],
    sentences: list[Sentence] | None,
    segment_tokens: int,
) -> list[Segment]:
    """Segments of one video from its clips (clip_index, start_s, end_s), one token per clip."""
    if len(clips) != len(video_tokens):
        raise ValueError(f"{video_id}: {len(clips)} clips but {len(video_tokens)} video tokens")
    if segment_tokens < 1:
        raise ValueError("segment_tokens must be >= 1")
    order = sorted(range(len(clips)), key=lambda i: clips[i][0])
    ordered = [(clips[i][1], clips[i][2], int(video_tokens[i])) for i in order]

    # (start_s, end_s, tie-break, text, tokens); tie-break keeps sentences before video-only.
    drafts: list[tuple[float, float, int, str, list[int]]] = []
    covered = [False] * len(ordered)
    starts, ends = [c[0] for c in ordered], [c[1] for c in ordered]
    # Clips in index order follow each other in time, so a sentence's clips are one run found
    # by bisection: linear in the number of sentences, not sentences x clips.
    in_time_order = starts == sorted(starts) and ends == sorted(ends)
    for number, sentence in enumerate(sentences or []):
        if in_time_order:
            first = bisect.bisect_right(ends, sentence.start_s)
            last = (
                bisect.bisect_right(starts, sentence.start_s)
                if sentence.start_s == sentence.end_s
                else (bisect.bisect_left(starts, sentence.end_s))
            )
            hit = [
                i for i in range(first, last) if _overlaps(*ordered[i][:2], sentence.start_s, sentence.end_s)
            ]
        else:
            hit = [
                i
                for i, (cs, ce, _) in enumerate(ordered)
                if _overlaps(cs, ce, sentence.start_s, sentence.end_s)
            ]
        if not hit:
            continue
        for i in hit:
            covered[i] = True
        tokens = [ordered[i][2] for i in hit]
        drafts.append((sentence.start_s, sentence.end_s, number, sentence.text, tokens))

    run: list[int] = []  # indices of consecutive uncovered clips

    def close_run() -> None:
        for begin in range(0, len(run), segment_tokens):
            chunk = run[begin : begin + segment_tokens]
            tokens = [ordered[i][2] for i in chunk]
            drafts.append((ordered[chunk[0]][0], ordered[chunk[-1]][1], len(drafts) + 1_000_000, "", tokens))
        run.clear()

    for i in range(len(ordered)):
        if covered[i]:
            close_run()
        else:
            run.append(i)
    close_run()

    drafts.sort(key=lambda d: (d[0], d[1], d[2]))
    return [
        Segment(video_id, index, float(start), float(end), text, tokens)
        for index, (start, end, _, text, tokens) in enumerate(drafts)
    ]
