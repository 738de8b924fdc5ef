"""Peak RSS of a decode worker on a 2-hour video vs a 2-minute one, each in a fresh process.

    python benchmarks/bench_decode_memory.py [--cache DIR]

The videos are generated once into a cache directory (low resolution, 4 fps, h264 ultrafast,
so the 2-hour one takes about a minute to make): a moving shape on a noisy background, so
every frame carries data. Each measurement runs `iter_clips` over the whole video in a fresh
Python process and reads its peak resident set size (ru_maxrss). The peer is the same worker
on the 2-minute video. Goal: 2-hour peak within 1.2x of the 2-minute peak.
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

WIDTH, HEIGHT, FPS = 160, 90, 4

WORKER = """
import json, resource, sys, time
from videobert.config import DecodeConfig
from videobert.decode import iter_clips
started = time.perf_counter()
clips = sum(1 for _ in iter_clips(sys.argv[1], DecodeConfig(fps=4, clip_frames=8, size=64)))
print(json.dumps({"clips": clips, "seconds": time.perf_counter() - started,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_long_video(path: Path, seconds: int) -> Path:
    """A `seconds`-long 160x90 4 fps h264 video, written frame by frame (never all in memory)."""
    if path.exists():
        return path
    tmp = path.with_suffix(".partial.mp4")
    rng = np.random.default_rng(seconds)
    backgrounds = rng.integers(0, 80, size=(16, HEIGHT, WIDTH, 3), dtype=np.uint8)
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "30"}
        for i in range(seconds * FPS):
            image = backgrounds[i % 16].copy()
            x = (i * 3) % (WIDTH - 20)
            image[30:60, x : x + 20] = (220, 40, 40)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    tmp.rename(path)
    return path


def measure(path: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", WORKER, str(path)], capture_output=True, text=True, cwd=REPO, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(REPO / "out" / "bench-cache"))
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
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
