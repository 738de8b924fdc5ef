"""Peak RSS of a decode worker on a 2-hour video vs a 2-minute one, and on hostile inputs.

    python benchmarks/bench_decode_memory.py [--cache DIR] [--part long|hostile|all]

`long` (the default): the videos are generated once into a cache directory (low resolution,
4 fps, h264 ultrafast, so the 2-hour one takes about a minute to make): a moving shape on a
noisy background, so every frame carries data. Each measurement runs `iter_clips` over the
whole video in a fresh Python process and reads its peak resident set size (VmHWM, or
ru_maxrss without /proc). The peer is the same worker on the 2-minute video. Goal: 2-hour peak
within 1.2x of the 2-minute peak.

`hostile`: one decode each, at the paper's settings (20 fps, 30-frame clips, 224 px) and the
default bounds of `DecodeConfig`, of ordinary videos (the 2-minute one, 1080p h264) and of
tiny files built to cost much more than their size (tests/videos.py): 2x8192 frames, a header
claiming 16000x16000 frames, real 8192x4320 frames, a frame at 300 s after one at 0.1 s. Each
hostile input is also decoded with its bound raised, to show what the bound saves. Every run
is short (seconds; about 10 s to make the inputs the first time). Goal: every decode's peak
within a fixed figure, whatever the input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import videos  # noqa: E402  (the hostile inputs; the repo root is on the path above)

WIDTH, HEIGHT, FPS = 160, 90, 4

# The long-video settings; the hostile part uses the paper's (DecodeConfig defaults).
LONG_CONFIG = {"fps": 4, "clip_frames": 8, "size": 64}

WORKER = """
import json, os, re, resource, sys, time
from videobert.config import DecodeConfig
from videobert.decode import DecodeError, iter_clips

def peak_mb():
    # VmHWM starts afresh in this process; ru_maxrss would carry the parent's peak over exec.
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as status:
            return int(re.search(r"VmHWM:\\s+(\\d+)", status.read()).group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

config = DecodeConfig(**json.loads(sys.argv[2]))
base = peak_mb()
started = time.perf_counter()
clips, error = 0, None
try:
    for _ in iter_clips(sys.argv[1], config):
        clips += 1
except DecodeError as caught:
    error = caught.reason
print(json.dumps({"clips": clips, "seconds": time.perf_counter() - started, "base_rss_mb": base,
                  "peak_rss_mb": peak_mb(), "error": error}))
"""


def make_long_video(
    path: Path, seconds: int, width: int = WIDTH, height: int = HEIGHT, fps: int = FPS
) -> Path:
    """A `seconds`-long h264 video (160x90 4 fps unless told), written frame by frame (never all in memory)."""
    if path.exists():
        return path
    tmp = path.with_suffix(".partial.mp4")
    rng = np.random.default_rng(seconds)
    backgrounds = rng.integers(0, 80, size=(16, height, width, 3), dtype=np.uint8)
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "30"}
        for i in range(seconds * fps):
            image = backgrounds[i % 16].copy()
            x = (i * 3) % (width - 20)
            image[height // 3 : height * 2 // 3, x : x + 20] = (220, 40, 40)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    tmp.rename(path)
    return path


def measure(path: Path, config: dict | None = None) -> dict:
    """Decode `path` once in a fresh Python process; clips, seconds, peak RSS, error reason."""
    result = subprocess.run(
        [sys.executable, "-c", WORKER, str(path), json.dumps(LONG_CONFIG if config is None else config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_large_frames(path: Path, width: int, height: int, seconds: int = 2, refs: int = 1) -> Path:
    """A `seconds`-long 4 fps h264 video of width x height frames, `refs` reference frames.

    A flat picture with a moving bar: a few hundred KB however large the frames. 16 references
    make the decoder keep 16 frames, the most H.264 allows.
    """
    if path.exists():
        return path
    tmp = path.with_suffix(".partial.mp4")
    image = np.full((height, width, 3), (40, 120, 200), np.uint8)
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "30", "ref": str(refs), "keyint": "1000"}
        for i in range(seconds * 4):
            frame_image = image.copy()
            frame_image[:, (i * 64) % width : (i * 64) % width + 64] = (220, 40, 40)
            frame = av.VideoFrame.from_ndarray(frame_image, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    tmp.rename(path)
    return path


def hostile(cache: Path) -> None:
    """One decode per row, paper settings; each hostile input with the default bounds and raised."""
    normal = make_long_video(cache / "two_minutes.mp4", 120)
    hd = make_long_video(cache / "1080p_10s.mp4", 10, width=1920, height=1080, fps=30)
    inputs = {
        "2x8192": videos.make_extreme_aspect(cache / "thin_2x8192.mkv", n=8),
        "16000x16000 header": videos.make_huge_header(cache / "huge_header.mkv"),
        "4096x2160 frames": make_large_frames(cache / "4k_16refs.mp4", 4096, 2160, seconds=5, refs=16),
        "8192x4320 frames": make_large_frames(cache / "8k.mp4", 8192, 4320),
        "frame at 300 s": videos.make_timestamp_gap(cache / "gap_300s.mkv"),
    }
    rows = [
        ("2-minute 160x90 h264", normal, {}),
        ("10 s 1080p h264", hd, {}),
        ("2x8192 ffv1", inputs["2x8192"], {}),
        ("2x8192 ffv1, max_aspect_ratio 10000", inputs["2x8192"], {"max_aspect_ratio": 10_000}),
        # At 224 px, scaling the whole frame first failed fast (too large for swscale); at 160 px it
        # made 160x655360 RGB frames: +1.4 GB. Cropping first makes that size cost nothing extra.
        (
            "2x8192 ffv1, max_aspect_ratio 10000, size 160",
            inputs["2x8192"],
            {"max_aspect_ratio": 10_000, "size": 160},
        ),
        ("header claims 16000x16000", inputs["16000x16000 header"], {}),
        ("4096x2160 h264, 16 refs (at max_pixels)", inputs["4096x2160 frames"], {}),
        ("8192x4320 h264", inputs["8192x4320 frames"], {}),
        ("8192x4320 h264, max_pixels 8192*4320", inputs["8192x4320 frames"], {"max_pixels": 8192 * 4320}),
        ("frame at 300 s", inputs["frame at 300 s"], {}),
        ("frame at 300 s, max_gap_s 400", inputs["frame at 300 s"], {"max_gap_s": 400}),
    ]
    print(f"{'input':48} {'size':>9} {'clips':>5} {'seconds':>7} {'base MB':>7} {'peak MB':>7}  result")
    for name, path, config in rows:
        row = measure(path, config)
        result = "ok" if row["error"] is None else row["error"][:90]
        print(
            f"{name:48} {path.stat().st_size / 1e3:7.1f}KB {row['clips']:5d} {row['seconds']:7.2f} "
            f"{row['base_rss_mb']:7.0f} {row['peak_rss_mb']:7.0f}  {result}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(REPO / "out" / "bench-cache"))
    parser.add_argument("--part", choices=["long", "hostile", "all"], default="long")
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.part in ("hostile", "all"):
        hostile(cache)
    if args.part == "hostile":
        return 0
    started = time.perf_counter()
    short = make_long_video(cache / "two_minutes.mp4", 120)
    long = make_long_video(cache / "two_hours.mp4", 7200)
    print(
        f"videos ready in {time.perf_counter() - started:.0f} s ({long.stat().st_size / 1e6:.1f} MB for 2 h)"
    )
    peer, ours = measure(short), measure(long)
    for name, row in (("2-minute", peer), ("2-hour", ours)):
        print(
            f"  {name:9} {row['clips']:5d} clips in {row['seconds']:6.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB"
        )
    ratio = ours["peak_rss_mb"] / peer["peak_rss_mb"]
    print(f"ratio 2-hour/2-minute peak RSS: {ratio:.3f} (goal <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
