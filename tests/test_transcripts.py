"""Transcript parsers (valid and malformed), rolling captions, sentence interpolation."""

from __future__ import annotations

import json
import time

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


# ---- hostile and odd transcripts (issue 12): a reason, never a crash, and linear time ----------

BIG = "9" * 5_000  # int() refuses so many digits (ValueError); as a float it is inf


def _json_item(start: str, end: str) -> bytes:
    return f'[{{"start": {start}, "end": {end}, "text": "Stir."}}]'.encode()


@pytest.mark.parametrize(
    ("data", "name", "reason"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "deep.json", "nested too deeply"),
        (b'[{"start": 0, "end": 1, "text": "x", "more": ' + b"[" * 100_000, "deep.json", "nested too deeply"),
        (_json_item(BIG, "1"), "big.json", "finite"),
        (_json_item("0", BIG + ".5"), "big.json", "finite"),
        (_json_item("0", "1e999"), "big.json", "finite"),
        (_json_item("NaN", "1"), "nan.json", "finite"),
        (_json_item("0", "NaN"), "nan.json", "finite"),
        (_json_item("0", "Infinity"), "inf.json", "finite"),
        (_json_item("-Infinity", "1"), "inf.json", "finite"),
        (_json_item("-1.5", "1"), "negative.json", "starts before 0"),
        (_json_item("3", "2"), "backwards.json", "ends before it starts"),
        (b"1\n00:00:03,000 --> 00:00:02,000\nhi\n", "backwards.srt", "ends before it starts"),
        (f"WEBVTT\n\n{BIG}:00:00.000 --> 00:00:02.000\nhi\n".encode(), "hours.vtt", "bad timestamp"),
        (b"WEBVTT\n\n00:00:01.000 --> 00:00:02.000\ncaf\xe9\n", "latin1.vtt", "not UTF-8"),
        (b'[{"start": 0, "end": 1, "text": "caf\xe9"}]', "latin1.json", "not UTF-8"),
    ],
)
def test_hostile_transcripts_raise_a_short_reason(data, name, reason):
    with pytest.raises(TranscriptError, match=reason) as caught:
        parse_transcript(data, name)
    assert name in str(caught.value) and len(str(caught.value)) < 300


def test_huge_numbers_outside_the_times_are_harmless():
    data = f'[{{"start": 0, "end": 2, "text": "Stir.", "id": {BIG}, "score": NaN}}]'.encode()
    assert parse_transcript(data, "extra.json") == [Cue(0.0, 2.0, "Stir.")]


def test_huge_character_reference_is_replaced_not_a_crash():
    data = f"WEBVTT\n\n00:00:01.000 --> 00:00:02.000\nfry &#{BIG}; it &#65;&#x1F373;\n".encode()
    assert parse_transcript(data, "charref.vtt") == [Cue(1.0, 2.0, "fry \ufffd it A\U0001f373")]


def test_unexpected_parser_failure_becomes_a_transcript_error(monkeypatch):
    import videobert.transcripts as transcripts

    def broken(data: bytes, name: str) -> list[Cue]:
        raise KeyError("surprise")

    monkeypatch.setitem(transcripts.PARSERS, "srt", broken)
    with pytest.raises(TranscriptError, match=r"a\.srt: cannot parse: KeyError"):
        parse_transcript(SRT, "a.srt")


def _best_seconds(action, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - began)
    return best


def _rolling_vtt(cues: int, lines: int) -> bytes:
    """Big rolling captions: each cue of `lines` lines starts with the previous cue's last line."""
    out = ["WEBVTT", ""]
    for c in range(cues):
        out += [f"00:00:{c:02d}.000 --> 00:00:{c:02d}.900"]
        out += [f"word{c * (lines - 1) + i}" for i in range(lines)] + [""]
    return "\n".join(out).encode()


def test_rolling_caption_removal_is_linear():
    small, large = _rolling_vtt(2, 20_000), _rolling_vtt(2, 40_000)  # about 400 and 800 KiB
    cues = parse_transcript(small, "rolling.vtt")
    assert [c.text.split()[0] for c in cues] == ["word0", "word20000"]  # the repeat is dropped
    assert len(small) > 380_000

    def parse(data: bytes):
        return lambda: to_sentences(parse_transcript(data, "rolling.vtt"))

    small_s, large_s = _best_seconds(parse(small)), _best_seconds(parse(large))
    # Linear: ~0.05 s and ~0.1 s here; the old quadratic search took ~1 s and ~4 s.
    assert large_s < 1.0, f"{len(large)} bytes took {large_s:.2f} s"
    assert large_s < 3 * small_s + 0.1, f"doubling the input: {small_s:.3f} s -> {large_s:.3f} s"


@pytest.mark.parametrize(
    "line",
    [
        "<" * 100_000,  # tags that never close
        "{\\" * 100_000,  # SRT codes that never close
        "." * 50_000 + "x",  # a run of marks that ends no sentence
        "&#" * 25_000,  # (this and the next: guards, linear before too)
        ("a" * 30 + " ") * 2_000,  # one long unpunctuated sentence
    ],
)
def test_hostile_lines_take_linear_time(line):
    data = f"WEBVTT\n\n00:00:01.000 --> 00:00:02.000\n{line}\n".encode()
    seconds = _best_seconds(lambda: to_sentences(parse_transcript(data, "hostile.vtt")), repeat=1)
    assert seconds < 0.5


# ---- reading one transcript (token_shards.load_sentences) and the tokenize batch body -----------


def test_load_sentences_refuses_a_file_over_the_size_limit(tmp_path):
    from videobert.token_shards import load_sentences

    good = tmp_path / "good.vtt"
    good.write_bytes(VTT)
    assert [s.text for s in load_sentences(str(good), max_bytes=len(VTT))][0] == "Crack the eggs & whisk."
    with pytest.raises(TranscriptError, match=rf"{len(VTT)} bytes, over the {len(VTT) - 1}-byte limit"):
        load_sentences(str(good), max_bytes=len(VTT) - 1)
    huge = tmp_path / "huge.vtt"  # sparse: 64 MiB on paper, only the first limit + 1 bytes are read
    with open(huge, "wb") as handle:
        handle.write(b"WEBVTT\n\n")
        handle.truncate(64 << 20)
    with pytest.raises(TranscriptError, match="67108864 bytes, over the .*tokenize.max_transcript_bytes"):
        load_sentences(str(huge))  # the default limit (TokenizeConfig), a few MiB


def test_load_sentences_turns_any_failure_into_a_transcript_error(tmp_path, monkeypatch):
    import videobert.token_shards as token_shards

    with pytest.raises(TranscriptError, match="missing.vtt: cannot read"):
        token_shards.load_sentences(str(tmp_path / "missing.vtt"))
    path = tmp_path / "a.vtt"
    path.write_bytes(VTT)

    def broken(cues, max_gap_s):
        raise ZeroDivisionError("surprise")

    monkeypatch.setattr(token_shards, "to_sentences", broken)
    with pytest.raises(TranscriptError, match="a.vtt: cannot parse: ZeroDivisionError"):
        token_shards.load_sentences(str(path))


def test_token_shard_writer_records_hostile_transcripts_and_keeps_the_batch(tmp_path, monkeypatch):
    """Without Ray: every hostile transcript is its video's transcript_error, with video-only
    segments; the good video in the same batch still gets its sentences."""
    import videobert.token_shards as token_shards
    from tests.feature_corpus import PROTOTYPES, TRANSCRIPTS, write_video
    from videobert.codebook import HierarchicalCodebook
    from videobert.text_tokenizer import TextTokenizer

    output, source = str(tmp_path / "out"), str(tmp_path / "videos")
    codebook = HierarchicalCodebook.fit(
        PROTOTYPES.astype("float32"), k=2, depth=1, iterations=5, device="cpu"
    )
    tokenizer = TextTokenizer.train(["crack the eggs into the bowl", "whisk them well"], vocab_size=60)
    writer = token_shards.TokenShardWriter(
        output,
        codebook.save_to_output(output),
        tokenizer.save_to_output(output),
        segment_tokens=4,
        device="cpu",
        max_transcript_bytes=300_000,
    )
    sidecars = {
        "good": ("vtt", TRANSCRIPTS["vtt"]),
        "deep": ("json", b"[" * 100_000 + b"]" * 100_000),
        "big": ("json", _json_item("0", BIG)),
        "nan": ("json", _json_item("NaN", "1")),
        "large": ("vtt", b"WEBVTT\n\n" + b"x" * 300_000),
        "latin1": ("vtt", b"WEBVTT\n\n00:00:01.000 --> 00:00:02.000\ncaf\xe9\n"),
        "boom": ("srt", TRANSCRIPTS["srt"]),
    }
    vids = {
        key: write_video(output, source, number, clips=8, transcript=kind, transcript_data=data)
        for number, (key, (kind, data)) in enumerate(sidecars.items())
    }
    real_load = token_shards.load_sentences

    def load(uri, *args):  # a failure that load_sentences would not catch: a bug's stand-in
        if uri.endswith(".srt"):
            raise RuntimeError("unexpected")
        return real_load(uri, *args)

    monkeypatch.setattr(token_shards, "load_sentences", load)
    batch = {
        "video_id": list(vids.values()),
        "transcript_uri": [f"{source}/video{n}.{kind}" for n, (kind, _) in enumerate(sidecars.values())],
    }
    status = writer(batch)
    errors = dict(zip(status["video_id"], status["transcript_error"], strict=True))
    reasons = {key: errors[vid] for key, vid in vids.items()}
    assert reasons["good"] is None
    assert "nested too deeply" in reasons["deep"]
    assert "finite" in reasons["big"] and "finite" in reasons["nan"]
    assert "over the 300000-byte limit" in reasons["large"]
    assert "not UTF-8" in reasons["latin1"]
    assert "unexpected" in reasons["boom"]
    assert status["error"] == [None] * len(vids) and all(n > 0 for n in status["segments"])
    texts: dict[str, set[str]] = {}
    for row in token_shards.read_tokens(
        output, writer.codebook_version, writer.tokenizer_version
    ).to_pylist():
        texts.setdefault(row["video_id"], set()).add(row["text"])
    assert "Crack the eggs into the bowl." in texts[vids["good"]]
    assert all(texts[vid] == {""} for key, vid in vids.items() if key != "good")  # video-only
