"""`ray job submit` of the extract stage to the local `ray start --head` cluster, checked by its outputs.

Ray 2.60 token auth: `ray start` enables it whenever a token exists (~/.ray/auth_token), so
the submitting client must run with RAY_AUTH_MODE=token (conftest sets it for the whole
session) to send that token to the dashboard. The working directory is uploaded without the
virtualenv and caches (`excludes`), and the job's driver runs with this interpreter, which
has the project installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from tests import videos
from videobert import tables

REPO = Path(__file__).resolve().parent.parent


def test_ray_job_submit_extract(ray_cluster, tmp_path: Path) -> None:
    source = tmp_path / "videos"
    for i in range(2):
        videos.make_object_video(source / f"clip{i}.mp4", seed=20 + i, num_frames=24, height=64, width=64)
    videos.make_zero_bytes(source / "broken.mp4")
    output = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "source": str(source),
                "output": str(output),
                "decode": {"fps": 8, "clip_frames": 8, "size": 64},
                "encoder": {"weights": "none", "clips_per_batch": 4},
                "extract": {"feature_actors": 1},
            }
        )
    )
    result = ray_cluster.submit([sys.executable, "-m", "pipelines.extract", "--config", str(config)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 videos listed: 2 ok, 1 error" in result.stdout  # the job's closing summary, streamed back

    manifest = tables.read_manifest(str(output))
    statuses = sorted(
        zip(manifest.column("status").to_pylist(), manifest.column("num_clips").to_pylist(), strict=True)
    )
    assert statuses == [("error", 0), ("ok", 3), ("ok", 3)]
    assert tables.read_features(str(output)).num_rows == 6
