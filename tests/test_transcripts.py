"""Transcript parsers (valid and malformed), rolling captions, sentence interpolation."""

from __future__ import annotations

import json

import pytest

from videobert.transcripts import Cue, Sentence, TranscriptError, parse_transcript, to_sentences

VTT = b"""WEBVTT
Kind: captions

NOTE a comment that is not a cue

intro
00:00:01.000 --> 00:00:03.000 align:start position:0%
<v Chef>Crack the <b>eggs</b> &amp; whisk.</v>

00:03.500 --> 00:05.000
Now heat the pan.
"""

SRT = b"""1
00:00:01,000 --> 00:00:03,000
{\\an8}<i>Crack the eggs</i>

2
00:00:03,000 --> 00:00:04,500
and whisk them.
"""

# YouTube auto-captions: each cue repeats the previous line, with inline word timings,
# and a 10 ms cue that only holds the finished line.
ROLLING = b"""WEBVTT
Kind: captions
Language: en

00:00:00.000 --> 00:00:02.000 align:start position:0%
first<00:00:00.500><c> we</c><00:00:01.000><c> chop</c>

00:00:02.000 --> 00:00:02.010 align:start position:0%
first we chop

00:00:02.010 --> 00:00:04.000 align:start position:0%
first we chop
the<00:00:02.500><c> onions</c>

00:00:04.000 --> 00:00:06.000 align:start position:0%
the onions
very finely
"""


def test_vtt():
    cues = parse_transcript(VTT, "video.vtt")
    assert cues == [Cue(1.0, 3.0, "Crack the eggs & whisk."), Cue(3.5, 5.0, "Now heat the pan.")]


def test_srt():
    cues = parse_transcript(SRT, "video.srt")
    assert cues == [Cue(1.0, 3.0, "Crack the eggs"), Cue(3.0, 4.5, "and whisk them.")]


def test_json():
    data = json.dumps(
        [{"start": 0, "end": 2.5, "text": "Hello <i>there</i>."}, {"start": 3, "end": 4, "text": " "}]
    )
    assert parse_transcript(data.encode(), "v.JSON") == [Cue(0.0, 2.5, "Hello there.")]


def test_rolling_auto_captions_are_deduplicated():
    cues = parse_transcript(ROLLING, "auto.vtt")
    assert cues == [
        Cue(0.0, 2.0, "first we chop"),
        Cue(2.01, 4.0, "the onions"),
        Cue(4.0, 6.0, "very finely"),
    ]


@pytest.mark.parametrize(
    ("data", "name", "reason"),
    [
        (b"00:00:01.000 --> 00:00:02.000\nhi\n", "a.vtt", "WEBVTT header"),
        (b"WEBVTT\n\n00:00:01.000 --> 00:00:xx.000\nhi\n", "a.vtt", "bad timestamp"),
        (b"WEBVTT\n\n00:00:03.000 --> 00:00:02.000\nhi\n", "a.vtt", "ends before it starts"),
        (b"WEBVTT\n\njust text without timing\n", "a.vtt", "timing line"),
        (b"1\n00:00:01,000 -> 00:00:02,000\nhi\n", "a.srt", "timing line"),
        (b"\xff\xfe\x00garbage", "a.srt", "not UTF-8"),
        (b'[{"start": 1, "end": 2}]', "a.json", "start, end and text"),
        (b'{"start": 1}', "a.json", "JSON list"),
        (b'[{"start": "1", "end": 2, "text": "x"}]', "a.json", "numbers"),
        (b'[{"start": 1, "end": 2, "text": "x"', "a.json", "not valid JSON"),
        (b"hello", "a.txt", "unknown transcript format"),
    ],
)
def test_malformed_transcripts_raise_with_reason(data, name, reason):
    with pytest.raises(TranscriptError, match=reason):
        parse_transcript(data, name)


def test_cue_with_several_sentences_is_split_by_characters():
    # 20 characters over 2 s: 0.1 s per character.
    sentences = to_sentences([Cue(10.0, 12.0, "Cut it now. Fry it!!")])
    assert sentences == [Sentence(10.0, 11.1, "Cut it now."), Sentence(11.2, 12.0, "Fry it!!")]


def test_sentence_spanning_cues_takes_first_start_and_last_end():
    cues = [Cue(0.0, 2.0, "Crack the eggs"), Cue(2.0, 3.0, "and whisk. Then"), Cue(3.0, 4.0, "season.")]
    sentences = to_sentences(cues)
    # "and whisk." ends at char 10 of 15 in the second cue; "Then" starts at char 11.
    assert [s.text for s in sentences] == ["Crack the eggs and whisk.", "Then season."]
    assert sentences[0].start_s == 0.0 and sentences[0].end_s == pytest.approx(2.0 + 10 / 15)
    assert sentences[1].start_s == pytest.approx(2.0 + 11 / 15) and sentences[1].end_s == 4.0


def test_long_pause_ends_an_unpunctuated_sentence():
    cues = [Cue(0.0, 1.0, "first we chop"), Cue(1.5, 2.0, "the onions"), Cue(6.0, 7.0, "then fry")]
    sentences = to_sentences(cues, max_gap_s=2.0)
    assert sentences == [Sentence(0.0, 2.0, "first we chop the onions"), Sentence(6.0, 7.0, "then fry")]
