"""Narration transcripts: WebVTT, SRT and JSON sidecars -> cues -> sentences.

`parse_transcript(data, name)` picks the parser from the file extension, strips markup
(tags, inline timestamps, HTML entities, SRT `{\\an8}` codes), and removes the repetition of
YouTube-style rolling auto-captions: when a cue starts with the last line(s) of the
previous cue, those lines are dropped, and a cue left empty is dropped.

`to_sentences(cues)` splits the cue text into sentences at `.`, `!`, `?` and `…` (followed
by a space or the end), and also at a pause longer than `max_gap_s` between cues, so
unpunctuated auto-captions still become sentence-sized pieces. Times are interpolated
linearly by characters: character i of a cue with n characters spans
[start + (end - start) * i / n, start + (end - start) * (i + 1) / n]. A sentence starts where
its first character starts and ends where its last character ends, whether it lies in one
cue, shares a cue with other sentences, or spans several cues.

A file that cannot be used raises `TranscriptError(reason)`: bad encoding or syntax, JSON
nested too deeply, times that are not finite, negative, or end before they start, and any
other failure inside a parser (`parse_transcript` turns it into a TranscriptError). All of it
is linear in the size of the file: patterns cannot backtrack quadratically on hostile text and
the rolling-caption overlap is found in one pass; bounding that size is the caller's job
(`token_shards.load_sentences` reads at most `tokenize.max_transcript_bytes`).
"""

from __future__ import annotations

import html
import json
import math
import posixpath
import re
from dataclasses import dataclass


class TranscriptError(ValueError):
    """A transcript that cannot be used; the message says why."""


@dataclass(frozen=True)
class Cue:
    """One caption cue: text shown from start_s to end_s."""

    start_s: float
    end_s: float
    text: str


@dataclass(frozen=True)
class Sentence:
    """One narration sentence with its (interpolated) time span."""

    start_s: float
    end_s: float
    text: str


_TIMING = re.compile(r"^\s*(\S+)\s+-->\s+(\S+)")
# At most 9 digits of hours: enough for any video, and int() stays cheap.
_TIMESTAMP = re.compile(r"^(?:(\d{1,9}):)?(\d{1,2}):(\d{1,2})[.,](\d{1,3})$")
# A tag or style code cannot contain its own opening character: each scan stops at the next
# one, so a line of 100,000 "<" costs one pass, not 100,000 (the same for the patterns below).
_TAG = re.compile(r"<[^<>]*>")
_SRT_CODE = re.compile(r"\{\\[^{}]*\}")
# A decimal character reference beyond U+10FFFF (html.unescape would give U+FFFD), caught
# before int() meets a 5,000-digit number.
_HUGE_CHARREF = re.compile(r"&#0*[1-9][0-9]{7,};?")
_SPACE = re.compile(r"\s+")
# Starts only at the first mark of a run and never gives marks back: a run of 100,000 dots
# followed by a letter is one failed attempt, not 100,000 backtracking ones.
_SENTENCE_END = re.compile(r"(?<![.!?…])[.!?…]++[\"')\]]*+(?=\s|$)")


def _show(text: str, limit: int = 60) -> str:
    """repr() of a piece of the file, cut short so that a reason stays readable."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _timestamp(text: str, where: str) -> float:
    match = _TIMESTAMP.match(text.strip())
    if not match:
        raise TranscriptError(f"{where}: bad timestamp {_show(text)}")
    hours, minutes, seconds, fraction = match.groups()
    if int(minutes) >= 60 or int(seconds) >= 60:
        raise TranscriptError(f"{where}: bad timestamp {_show(text)}")
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds) + int(fraction.ljust(3, "0")) / 1000


def clean_text(text: str) -> str:
    """Drop tags, inline timestamps and style codes, unescape entities, collapse spaces."""
    text = _HUGE_CHARREF.sub("\ufffd", _SRT_CODE.sub("", _TAG.sub("", text)))
    return _SPACE.sub(" ", html.unescape(text)).strip()


def _check_span(start: float, end: float, where: str) -> None:
    if not (math.isfinite(start) and math.isfinite(end)):
        raise TranscriptError(f"{where}: times must be finite numbers of seconds ({start} --> {end})")
    if start < 0:
        raise TranscriptError(f"{where}: cue starts before 0 s ({start} --> {end})")
    if end < start:
        raise TranscriptError(f"{where}: cue ends before it starts ({start} --> {end})")


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise TranscriptError(f"{name}: not UTF-8 text ({error.reason} at byte {error.start})") from error


def _blocks(text: str) -> list[list[str]]:
    blocks, current = [], []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def _cue_lines(lines: list[str], name: str, number: int) -> tuple[float, float, list[str]]:
    """Timing line (optionally after an identifier) + text lines of one cue block."""
    timing_at = 0 if "-->" in lines[0] else 1
    if timing_at >= len(lines) or "-->" not in lines[timing_at]:
        raise TranscriptError(f"{name}: cue {number} has no 'start --> end' timing line")
    match = _TIMING.match(lines[timing_at])
    if not match:
        raise TranscriptError(f"{name}: cue {number}: bad timing line {_show(lines[timing_at])}")
    where = f"{name}: cue {number}"
    start, end = _timestamp(match.group(1), where), _timestamp(match.group(2), where)
    _check_span(start, end, where)
    return start, end, lines[timing_at + 1 :]


def parse_vtt(data: bytes, name: str = "transcript.vtt") -> list[Cue]:
    text = _decode(data, name)
    blocks = _blocks(text)
    if not blocks or not blocks[0][0].startswith("WEBVTT"):
        raise TranscriptError(f"{name}: missing the WEBVTT header")
    cues = []
    for number, block in enumerate(blocks[1:], start=1):
        if block[0].startswith(("NOTE", "STYLE", "REGION")) and "-->" not in block[0]:
            continue
        start, end, lines = _cue_lines(block, name, number)
        cues.append((start, end, lines))
    return _finish(cues)


def parse_srt(data: bytes, name: str = "transcript.srt") -> list[Cue]:
    text = _decode(data, name)
    cues = []
    for number, block in enumerate(_blocks(text), start=1):
        start, end, lines = _cue_lines(block, name, number)
        cues.append((start, end, lines))
    if not cues and text.strip():
        raise TranscriptError(f"{name}: no SRT cues found")
    return _finish(cues)


def _json_int(text: str) -> int | float:
    # int() refuses more than 4,300 digits (ValueError); a float of that is inf, which the
    # time check rejects, and an unused field may hold it harmlessly.
    return int(text) if len(text) <= 18 else float(text)


def parse_json(data: bytes, name: str = "transcript.json") -> list[Cue]:
    text = _decode(data, name)
    try:
        items = json.loads(text, parse_int=_json_int)
    except json.JSONDecodeError as error:
        raise TranscriptError(f"{name}: not valid JSON: {error}") from error
    except RecursionError as error:
        raise TranscriptError(f"{name}: JSON nested too deeply (expected a list of objects)") from error
    if not isinstance(items, list):
        raise TranscriptError(f"{name}: expected a JSON list of {{start, end, text}}")
    cues = []
    for number, item in enumerate(items, start=1):
        where = f"{name}: item {number}"
        if not isinstance(item, dict) or not {"start", "end", "text"} <= item.keys():
            raise TranscriptError(f"{where}: expected an object with start, end and text")
        start, end, body = item["start"], item["end"], item["text"]
        numbers_ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (start, end))
        if not numbers_ok or not isinstance(body, str):
            raise TranscriptError(f"{where}: start/end must be numbers (seconds) and text a string")
        start, end = _seconds(start, where), _seconds(end, where)
        _check_span(start, end, where)
        cues.append((start, end, body.split("\n")))
    return _finish(cues)


def _seconds(value: int | float, where: str) -> float:
    try:
        return float(value)
    except OverflowError as error:  # an int too big for a float
        raise TranscriptError(f"{where}: times must be finite numbers of seconds") from error


def _finish(raw: list[tuple[float, float, list[str]]]) -> list[Cue]:
    """Clean each line, drop rolling-caption repeats and empty cues."""
    cues = []
    previous: list[str] = []
    for start, end, lines in raw:
        cleaned = [line for line in (clean_text(line) for line in lines) if line]
        new_lines = cleaned[_rolled_overlap(previous, cleaned) :]
        previous = cleaned
        if new_lines:
            cues.append(Cue(start, end, " ".join(new_lines)))
    return cues


def _rolled_overlap(previous: list[str], lines: list[str]) -> int:
    """How many leading lines of this cue repeat the trailing lines of the previous cue.

    The longest suffix of `previous` that is a prefix of `lines`, found with the KMP failure
    function of lines + [separator] + previous: O(len(previous) + len(lines)) comparisons, of
    line numbers rather than strings (each line is hashed once).
    """
    if not previous or not lines:
        return 0
    ids: dict[str, int] = {}
    sequence = [ids.setdefault(line, len(ids)) for line in lines]
    sequence.append(-1)  # matches no line: a border never crosses it
    sequence.extend(ids.get(line, -2) for line in previous)  # -2: a line not in `lines`
    failure = [0] * len(sequence)
    for i in range(1, len(sequence)):
        k = failure[i - 1]
        while k and sequence[i] != sequence[k]:
            k = failure[k - 1]
        if sequence[i] == sequence[k]:
            k += 1
        failure[i] = k
    return failure[-1]


PARSERS = {"vtt": parse_vtt, "srt": parse_srt, "json": parse_json}


def parse_transcript(data: bytes, name: str) -> list[Cue]:
    """Cues of a sidecar transcript; the parser is chosen by `name`'s extension.

    Raises TranscriptError, and only that, for a file it cannot use.
    """
    extension = posixpath.splitext(name)[1].lower().lstrip(".")
    if extension not in PARSERS:
        raise TranscriptError(f"{name}: unknown transcript format {_show(extension)} (known: vtt, srt, json)")
    try:
        return PARSERS[extension](data, name)
    except TranscriptError:
        raise
    except RecursionError as error:
        raise TranscriptError(f"{name}: nested too deeply to parse") from error
    except Exception as error:  # a parser bug or a case it does not know: this file's error, not a crash
        raise TranscriptError(
            f"{name}: cannot parse: {type(error).__name__}: {_show(str(error), 200)}"
        ) from error


def to_sentences(cues: list[Cue], max_gap_s: float = 2.0) -> list[Sentence]:
    """Sentences with times interpolated by characters (see the module docstring)."""
    sentences: list[Sentence] = []
    # The sentence being built: pieces of text and the time of its first character.
    pieces: list[str] = []
    sentence_start: float | None = None
    last_end: float | None = None  # end time of the last character taken

    def flush() -> None:
        nonlocal pieces, sentence_start
        text = " ".join(pieces).strip()
        if text and sentence_start is not None and last_end is not None:
            sentences.append(Sentence(round(sentence_start, 6), round(last_end, 6), text))
        pieces, sentence_start = [], None

    for cue in sorted(cues, key=lambda c: (c.start_s, c.end_s)):
        if pieces and last_end is not None and cue.start_s - last_end > max_gap_s:
            flush()  # a long pause ends the sentence even without punctuation
        text, n = cue.text, len(cue.text)
        per_char = (cue.end_s - cue.start_s) / n if n else 0.0
        position = 0
        while position < n:
            match = _SENTENCE_END.search(text, position)
            stop = match.end() if match else n
            chunk = text[position:stop]
            stripped = chunk.strip()
            if stripped:
                first = position + (len(chunk) - len(chunk.lstrip()))
                last = position + len(chunk.rstrip())  # one past the last character
                if sentence_start is None:
                    sentence_start = cue.start_s + per_char * first
                pieces.append(stripped)
                last_end = cue.start_s + per_char * last
            if match:
                flush()
            position = stop
    flush()
    return sentences
