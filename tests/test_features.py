"""S3D clip encoder: shapes, normalisation, seeded random weights, state-dict loading, offline error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from videobert import storage
from videobert.config import ConfigError, EncoderConfig
from videobert.features import ClipEncoder, EncoderWeightsError, build_s3d, encoder_id


@pytest.fixture(scope="module")
def clips() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(3, 8, 48, 48, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def random_encoder() -> ClipEncoder:
    return ClipEncoder(EncoderConfig(weights="none", seed=0), device="cpu")


def test_shape_dtype_and_unit_norm(random_encoder: ClipEncoder, clips: np.ndarray) -> None:
    features = random_encoder(clips)
    assert features.shape == (3, 1024) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    # Different clips give different features (the encoder is not collapsing its input).
    assert np.abs(features[0] - features[1]).max() > 1e-3
    assert random_encoder.encoder_id == "s3d-random0-l2"


@pytest.mark.parametrize("frames, size", [(1, 32), (16, 96)])
def test_any_size_and_frame_count(random_encoder: ClipEncoder, frames: int, size: int) -> None:
    """S3D's own classifier pooling only fits 224 px; pooling the features works at any size."""
    batch = np.random.default_rng(1).integers(0, 256, size=(2, frames, size, size, 3), dtype=np.uint8)
    assert random_encoder(batch).shape == (2, 1024)


def test_random_weights_follow_the_seed(clips: np.ndarray, random_encoder: ClipEncoder) -> None:
    torch.manual_seed(12345)  # the global RNG must not matter
    same = ClipEncoder(EncoderConfig(weights="none", seed=0), device="cpu")
    other = ClipEncoder(EncoderConfig(weights="none", seed=1), device="cpu")
    np.testing.assert_array_equal(same(clips), random_encoder(clips))
    assert np.abs(other(clips) - random_encoder(clips)).max() > 1e-3
    assert other.encoder_id == "s3d-random1-l2"


def test_batch_composition_does_not_change_a_clip_feature(
    random_encoder: ClipEncoder, clips: np.ndarray
) -> None:
    together = random_encoder(clips)
    alone = np.concatenate([random_encoder(clips[i : i + 1]) for i in range(len(clips))])
    np.testing.assert_allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_state_dict_file_is_loaded(
    tmp_path: Path, clips: np.ndarray, random_encoder: ClipEncoder, suffix: str
) -> None:
    state = random_encoder.model.state_dict()
    path = tmp_path / f"s3d{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    from_file = ClipEncoder(EncoderConfig(weights=str(path)), device="cpu")
    np.testing.assert_allclose(from_file(clips), random_encoder(clips), atol=1e-6)
    assert from_file.encoder_id.startswith("s3d-s3d-") and from_file.encoder_id.endswith("-l2")


def test_state_dict_from_s3(
    tmp_path: Path, s3_bucket: str, clips: np.ndarray, random_encoder: ClipEncoder
) -> None:
    path = tmp_path / "s3d.pth"
    torch.save(random_encoder.model.state_dict(), path)
    uri = f"{s3_bucket}/weights/s3d.pth"
    storage.write_bytes(uri, path.read_bytes())
    remote = ClipEncoder(EncoderConfig(weights=uri), device="cpu")
    np.testing.assert_allclose(remote(clips), random_encoder(clips), atol=1e-6)


def test_bad_weight_files_are_clear_config_errors(tmp_path: Path) -> None:
    with pytest.raises(EncoderWeightsError, match="cannot read the weights file"):
        build_s3d(EncoderConfig(weights=str(tmp_path / "missing.pth")))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderWeightsError, match="not a loadable state dict"):
        build_s3d(EncoderConfig(weights=str(junk)))
    wrong = tmp_path / "wrong.pth"
    torch.save({"something.else": torch.zeros(2)}, wrong)
    with pytest.raises(EncoderWeightsError, match="not an S3D state dict"):
        build_s3d(EncoderConfig(weights=str(wrong)))


def test_offline_pretrained_weights_error_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty hub cache, and a proxy that refuses connections: the download is really attempted
    # and really fails, also on a machine with internet.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    with pytest.raises(EncoderWeightsError) as caught:
        build_s3d(EncoderConfig(weights="kinetics400"))
    message = str(caught.value)
    assert "encoder.weights=none" in message and "encoder.weights=/path" in message
    assert str(tmp_path / "torch-home") in message
    assert isinstance(caught.value, ConfigError)  # so the stage exits 2 with this message


def test_encoder_id_names_the_weights() -> None:
    assert encoder_id(EncoderConfig()) == "s3d-kinetics400-l2"
    assert encoder_id(EncoderConfig(weights="none", seed=4)) == "s3d-random4-l2"


def test_rejects_bad_input(random_encoder: ClipEncoder) -> None:
    with pytest.raises(ValueError, match="uint8"):
        random_encoder(np.zeros((1, 8, 32, 32, 3), np.float32))
