"""Typed config: YAML loading, --set overrides, errors that name the key, CLI exit codes,
no credentials in any URI."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pipelines.cli import STAGES
from pipelines.cli import main as cli_main
from videobert.config import (
    ConfigError,
    DeprecatedConfigKeyWarning,
    ExperimentConfig,
    ModelRef,
    config_to_yaml,
    flat_params,
    load_config,
    parse_model_uri,
    redact,
)
from videobert.model_sizes import MODEL_SIZES, ModelSize

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
        path, ["decode.size=96", "encoder.clips_per_batch=4", "decode.max_clips=null", "output=/tmp/o"]
    )
    assert config.source == "s3://bucket/videos" and config.output == "/tmp/o"
    assert (config.decode.fps, config.decode.size, config.decode.max_clips) == (8.0, 96, None)
    assert isinstance(config.decode.fps, float)  # an int in YAML is coerced to the float field
    assert (config.encoder.weights, config.encoder.clips_per_batch) == ("none", 4)
    assert load_config(path, ["decode.extensions=mp4, mkv"]).decode.extensions == ["mp4", "mkv"]


def test_shipped_configs_load() -> None:
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no deprecated keys in what we ship
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
        (
            ["finetune.pooled_features=false", "finetune.template_features=false"],
            "finetune.pooled_features and finetune.template_features cannot both be false",
        ),
        (["finetune.zero_shot_weight=1.5"], "finetune.zero_shot_weight must be in"),
        (
            ["finetune.mode=full", "finetune.zero_shot_weight=0.5"],
            "finetune.zero_shot_weight needs finetune.mode",
        ),
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


def test_unknown_model_size_fails_at_load_listing_the_sizes() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["model.size=lareg"])
    message = str(caught.value)
    assert message.startswith("model.size: unknown size 'lareg'")
    assert all(size in message for size in ("debug", "base", "large"))
    assert load_config(None, ["model.size=debug"]).model.size == "debug"


def test_max_seq_len_is_checked_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"model\.max_seq_len must be >= 8"):
        load_config(None, ["model.max_seq_len=7"])
    assert load_config(None, ["model.max_seq_len=8"]).model.max_seq_len == 8
    # A size with a position limit caps max_seq_len (the shipped sizes have none).
    monkeypatch.setitem(MODEL_SIZES, "capped", ModelSize(64, 2, 2, 256, max_positions=32))
    with pytest.raises(ConfigError, match=r"model\.max_seq_len must be <= 32"):
        load_config(None, ["model.size=capped", "model.max_seq_len=33"])
    assert load_config(None, ["model.size=capped", "model.max_seq_len=32"]).model.max_seq_len == 32


def test_model_uris_follow_the_registered_model() -> None:
    default = load_config()
    assert default.evaluate.model_uri == "models:/videobert@candidate"
    assert default.embed.model_uri == "models:/videobert@champion"
    config = load_config(None, ["mlflow.registered_model=foo"])
    assert config.evaluate.model_uri == "models:/foo@candidate"
    assert config.embed.model_uri == "models:/foo@champion"
    # an explicit URI wins, and survives a dump and reload
    pinned = load_config(None, ["mlflow.registered_model=foo", "embed.model_uri=models:/bar/3"])
    assert (pinned.evaluate.model_uri, pinned.embed.model_uri) == ("models:/foo@candidate", "models:/bar/3")
    assert load_config(None, ["embed.model_uri=models:/bar/3"]) != pinned


def test_round_trip_keeps_resolved_uris(tmp_path: Path) -> None:
    config = load_config(None, ["mlflow.registered_model=foo"])
    path = tmp_path / "dumped.yaml"
    path.write_text(config_to_yaml(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    "override, key",
    [
        ("evaluate.model_uri=videobert", "evaluate.model_uri"),
        ("evaluate.model_uri=models:/videobert/3", "evaluate.model_uri must name an alias"),
        ("evaluate.model_uri=models:/videobert@", "evaluate.model_uri"),
        ("embed.model_uri=videobert@champion", "embed.model_uri"),
        ("embed.model_uri=models:/videobert", "embed.model_uri"),
        ("embed.model_uri=models:/videobert/three", "embed.model_uri"),
        ("embed.model_uri=models:/@champion", "embed.model_uri"),
        ("mlflow.registered_model=", "mlflow.registered_model"),
    ],
)
def test_bad_model_uri_fails_at_load(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [override])


def test_parse_model_uri() -> None:
    assert parse_model_uri("models:/videobert@champion") == ModelRef("videobert", "champion", None)
    assert parse_model_uri("models:/videobert/12") == ModelRef("videobert", None, "12")
    name, alias, version = parse_model_uri("models:/a/b@c")  # unpacks like the registry's tuple
    assert (name, alias, version) == ("a/b", "c", None)
    with pytest.raises(ConfigError, match="models:/<name>@<alias>"):
        parse_model_uri("runs:/abc/model")


@pytest.mark.parametrize(
    "old, new, attribute",
    [
        ("encoder.batch_size", "encoder.clips_per_batch", ("encoder", "clips_per_batch")),
        ("embed.batch_size", "embed.videos_per_batch", ("embed", "videos_per_batch")),
    ],
)
def test_deprecated_batch_size_keys_still_load_with_a_warning(
    old: str, new: str, attribute: tuple[str, str], tmp_path: Path
) -> None:
    with pytest.warns(DeprecatedConfigKeyWarning, match=re.escape(f"{old} is deprecated: use {new}")):
        config = load_config(None, [f"{old}=4"])
    section, name = attribute
    assert getattr(getattr(config, section), name) == 4
    # the same from a YAML file
    path = tmp_path / "old.yaml"
    path.write_text(f"{section}:\n  batch_size: 3\n")
    with pytest.warns(DeprecatedConfigKeyWarning, match=re.escape(new)):
        assert getattr(getattr(load_config(path), section), name) == 3
    params = flat_params(config)  # MLflow params carry the new name only
    assert params[new] == 4 and old not in params


def test_deprecated_and_new_key_together_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"encoder\.batch_size and encoder\.clips_per_batch are both set"):
        load_config(None, ["encoder.batch_size=4", "encoder.clips_per_batch=8"])
    with pytest.raises(ConfigError, match=r"embed\.batch_size and embed\.videos_per_batch are both set"):
        load_config(None, ["embed.videos_per_batch=8", "embed.batch_size=4"])
    # train.batch_size is not an alias: it keeps its own meaning (sequences per step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(None, ["train.batch_size=64"]).train.batch_size == 64


SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("s3.endpoint_url", f"http://AKIAEXAMPLE:{SECRET}@127.0.0.1:9000"),
        ("s3.endpoint_url", f"https://AKIAEXAMPLE:{SECRET}/with-a-slash@minio.example"),  # unescaped /
        ("source", f"s3://{SECRET}@bucket/videos"),
        ("output", f"https://user:{SECRET}@store.example/out"),
        ("mlflow.tracking_uri", f"http://mlflow:{SECRET}@mlflow.example:5000"),
        ("mlflow.tracking_uri", f"postgresql://mlflow:{SECRET}@db.example/mlflow"),
        ("evaluate.labels", f"https://{SECRET}@labels.example/labels.csv"),
        ("text.vocab", f"https://hf:{SECRET}@huggingface.co/vocab.txt"),
        ("train.storage_path", f"s3://key:{SECRET}@bucket/train"),
        ("decode.transcript_extensions", f"vtt, http://u:{SECRET}@x/"),
    ],
    ids=lambda item: item if "://" not in item else "uri",  # test ids hold no secret either
)
def test_credentials_in_any_uri_are_refused_without_echoing_them(
    key: str, value: str, tmp_path: Path
) -> None:
    """Any string field (found generically, lists too), from --set or from a file: a URI with
    userinfo is a ConfigError that names the key and where credentials go, and never the secret."""
    with pytest.raises(ConfigError) as raised:
        load_config(None, [f"{key}={value}"])
    message = str(raised.value)
    assert SECRET not in message and key in message
    assert "AWS_SECRET_ACCESS_KEY" in message and "MLFLOW_TRACKING_PASSWORD" in message
    section, _, field = key.rpartition(".")
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  {field}: '{value}'\n" if section else f"{key}: '{value}'\n")
    with pytest.raises(ConfigError, match=re.escape(key)) as raised:
        load_config(path)
    assert SECRET not in str(raised.value)


def test_credentials_set_in_code_are_refused_too() -> None:
    with pytest.raises(ConfigError, match="output") as raised:
        ExperimentConfig(output=f"s3://key:{SECRET}@bucket/out")
    assert SECRET not in str(raised.value)


@pytest.mark.parametrize("variable", ["MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "AWS_ENDPOINT_URL"])
def test_credentials_in_uri_environment_variables_are_refused(variable: str, monkeypatch) -> None:
    monkeypatch.setenv(variable, f"https://user:{SECRET}@service.example:443")
    with pytest.raises(ConfigError, match=variable) as raised:
        load_config(None, ["output=/tmp/o"])
    assert SECRET not in str(raised.value) and "MLFLOW_TRACKING_USERNAME" in str(raised.value)


def test_uris_without_credentials_still_load() -> None:
    config = load_config(
        None,
        [
            "source=s3://bucket/videos/take@2x",  # an @ in an S3 key is not a login
            "output=/data/runs/out@home",
            "s3.endpoint_url=http://127.0.0.1:9000",
            "mlflow.tracking_uri=http://mlflow.example:5000",
            "embed.model_uri=models:/videobert@champion",
        ],
    )
    assert config.source == "s3://bucket/videos/take@2x"
    assert config.embed.model_uri == "models:/videobert@champion"


def test_redact_hides_the_userinfo_of_every_uri_in_a_text() -> None:
    text = f"cannot reach http://AKIA:{SECRET}@minio:9000/b (then s3://{SECRET}@bucket) at /x@y"
    assert redact(text) == "cannot reach http://***@minio:9000/b (then s3://***@bucket) at /x@y"
    assert str(ConfigError(text)) == redact(text)
