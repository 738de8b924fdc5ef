"""Typed config: YAML loading, --set overrides, errors that name the key, CLI exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import STAGES
from pipelines.cli import main as cli_main
from videobert.config import ConfigError, ExperimentConfig, config_to_yaml, flat_params, load_config

REPO = Path(__file__).resolve().parent.parent


def test_defaults_are_the_paper_recipe() -> None:
    config = load_config()
    assert (config.decode.fps, config.decode.clip_frames, config.decode.size) == (20.0, 30, 224)
    assert config.encoder.weights == "kinetics400"
    assert config.codebook.vocab_size == 12**4
    assert config.decode.clip_seconds == pytest.approx(1.5)


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("source: s3://bucket/videos\ndecode:\n  fps: 8\n  size: 64\nencoder:\n  weights: none\n")
    config = load_config(
        path, ["decode.size=96", "encoder.batch_size=4", "decode.max_clips=null", "output=/tmp/o"]
    )
    assert config.source == "s3://bucket/videos" and config.output == "/tmp/o"
    assert (config.decode.fps, config.decode.size, config.decode.max_clips) == (8.0, 96, None)
    assert isinstance(config.decode.fps, float)  # an int in YAML is coerced to the float field
    assert (config.encoder.weights, config.encoder.batch_size) == ("none", 4)
    assert load_config(path, ["decode.extensions=mp4, mkv"]).decode.extensions == ["mp4", "mkv"]


def test_shipped_configs_load() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), ExperimentConfig), path
    demo = load_config(REPO / "configs/demo.yaml")
    assert demo.encoder.weights == "none" and demo.decode.size == 64


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    config = load_config(None, ["decode.fps=10", "train.workers=2", "train.batch_size=8"])
    path = tmp_path / "dumped.yaml"
    path.write_text(config_to_yaml(config))
    assert load_config(path) == config
    params = flat_params(config)
    assert params["decode.fps"] == 10.0 and params["train.workers"] == 2
    assert not any("secret" in key or "key_id" in key for key in params)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["decode.nope=1"], "unknown config key decode.nope"),
        (["nope=1"], "unknown config key nope"),
        (["decode.fps=fast"], "decode.fps: expected a number"),
        (["decode.clip_frames=1.5"], "decode.clip_frames: expected an integer"),
        (["codebook.refit=maybe"], "codebook.refit: expected true or false"),
        (["codebook.init_trials=0"], "codebook.init_trials must be >= 1"),
        (["codebook.max_points_per_centroid=-5"], "codebook.max_points_per_centroid must be >= 1"),
        (["decode.fps=0"], "decode.fps must be > 0"),
        (["encoder.dtype=fp8"], "encoder.dtype"),
        (["encoder.name=i3d"], "encoder.name"),
        (["decode=3"], "decode: expected a mapping"),
        (["train.batch_size=3", "train.workers=2"], "train.batch_size must be divisible"),
        (["decode.fps"], "expected key=value"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, overrides)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("decode: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("source: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError):  # safe_load refuses Python tags
        load_config(unsafe)


def test_cli_help_and_unknown_stage(capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["--help"]) == 0
    err = capsys.readouterr().err
    assert "usage: videobert <stage>" in err and "extract" in err
    assert cli_main(["no-such-stage"]) == 2
    assert "unknown stage 'no-such-stage'" in capsys.readouterr().err
    assert "extract" in STAGES and "demo-corpus" in STAGES


def test_cli_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Through the installed `videobert` command, as a user runs it."""
    videobert = Path(sys.executable).parent / "videobert"
    command = [str(videobert)] if videobert.exists() else [sys.executable, "-m", "pipelines.cli"]
    result = subprocess.run(
        [*command, "extract", "--set", "decode.fps=abc"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    assert "config error" in result.stderr and "decode.fps" in result.stderr
    with pytest.raises(SystemExit) as caught:  # argparse's --help
        cli_main(["extract", "--help"])
    assert caught.value.code == 0 and "--set" in capsys.readouterr().out
