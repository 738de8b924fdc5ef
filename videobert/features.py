"""Clip features: torchvision's S3D, pooled over time and space, L2-normalised (1024-d).

`model.features` is run and averaged over time and space instead of S3D's own classifier
pooling, whose fixed `AvgPool3d((2, 7, 7))` only fits 224 px input; this works at any size
and frame count. Features are L2-normalised because random-weight activations are ~1e-7 and
would mostly round to zero in the float16 feature table; the encoder id says so ("-l2").
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from videobert import storage
from videobert.config import ConfigError, EncoderConfig, S3Config

# Normalisation of torchvision's Kinetics-400 video models (S3D_Weights.KINETICS400_V1.transforms()).
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
# S3D's temporal pooling needs at least 5 frames; shorter clips repeat their last frame.
MIN_FRAMES = 5


class EncoderWeightsError(ConfigError):
    """The encoder weights asked for cannot be loaded; the message says what to do instead."""


def encoder_id(encoder: EncoderConfig) -> str:
    """Names the features an encoder config produces (recorded in the manifest)."""
    if encoder.weights == "kinetics400":
        source = "kinetics400"
    elif encoder.weights == "none":
        source = f"random{encoder.seed}"
    else:
        name = storage.stem(encoder.weights)
        source = f"{name}-{hashlib.sha1(encoder.weights.encode()).hexdigest()[:8]}"
    return f"{encoder.name}-{source}-l2"


def load_weights(encoder: EncoderConfig, s3: S3Config | None = None) -> dict[str, torch.Tensor] | None:
    """The state dict the config asks for; None for random weights (`none`)."""
    if encoder.weights == "none":
        return None
    if encoder.weights == "kinetics400":
        from torchvision.models.video import S3D_Weights

        weights = S3D_Weights.KINETICS400_V1
        try:
            return weights.get_state_dict(progress=False)
        except OSError as error:  # URLError and friends: offline or blocked
            cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
            raise EncoderWeightsError(
                f"encoder.weights=kinetics400: cannot download the S3D Kinetics-400 weights from "
                f"{weights.url} ({error}). Offline, either copy that file to {cache} (torch hub cache; "
                "set TORCH_HOME to move it), or give a state dict with --set encoder.weights=/path/or/s3/uri.pth "
                "(.pth or .safetensors), or choose random weights on purpose with --set encoder.weights=none."
            ) from error
    try:
        data = storage.read_bytes(encoder.weights, s3)
    except (FileNotFoundError, storage.StorageError) as error:
        raise EncoderWeightsError(
            f"encoder.weights={encoder.weights}: cannot read the weights file ({error}); give an existing "
            "state dict (.pth or .safetensors), kinetics400, or none for random weights."
        ) from error
    try:
        if encoder.weights.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise EncoderWeightsError(
            f"encoder.weights={encoder.weights}: not a loadable state dict ({error})"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EncoderWeightsError(f"encoder.weights={encoder.weights}: expected a state dict")
    return state


def build_s3d(encoder: EncoderConfig, s3: S3Config | None = None) -> torch.nn.Module:
    """torchvision's S3D with the weights the config asks for, in eval mode."""
    from torchvision.models.video import s3d

    state = load_weights(encoder, s3)
    if state is None:
        # Random weights are chosen on purpose: make every actor build the same ones.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(encoder.seed)
            model = s3d(weights=None)
    else:
        model = s3d(weights=None)
        missing, _ = model.load_state_dict(state, strict=False)
        missing_features = [key for key in missing if key.startswith("features.")]
        if missing_features:
            raise EncoderWeightsError(
                f"encoder.weights={encoder.weights}: not an S3D state dict "
                f"({len(missing_features)} feature weights missing, e.g. {missing_features[0]})"
            )
    return model.eval()


class ClipEncoder:
    """Clips (B, T, H, W, 3) uint8 -> L2-normalised S3D features (B, 1024) float32.

    The model is built once, so one encoder serves many batches (one per Ray actor).
    """

    def __init__(self, encoder: EncoderConfig, device: str | None = None, s3: S3Config | None = None) -> None:
        self.config = encoder
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder_id = encoder_id(encoder)
        self.model = build_s3d(encoder, s3).to(self.device)
        use_bf16 = encoder.dtype == "bfloat16" or (encoder.dtype == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        # (x / 255 - mean) / std as one multiply-add: x * scale + shift.
        shape = (1, 3, 1, 1, 1)
        std = torch.tensor(KINETICS_STD, device=self.device).view(shape)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -torch.tensor(KINETICS_MEAN, device=self.device).view(shape) / std

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 clips (B, T, H, W, 3), got {frames.dtype} {frames.shape}")
        # uint8 travels to the device (4x less than float32) and is normalised there.
        clips = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device, non_blocking=True)
        return self._encode(clips).cpu().numpy()

    def _encode(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) on the device -> unit-norm float32 features (B, 1024) there."""
        clips = clips.permute(0, 4, 1, 2, 3)  # (B, T, H, W, 3) -> (B, 3, T, H, W), a view
        clips = torch.addcmul(self.shift, clips.float(), self.scale)
        if clips.shape[2] < MIN_FRAMES:
            padding = clips[:, :, -1:].expand(-1, -1, MIN_FRAMES - clips.shape[2], -1, -1)
            clips = torch.cat([clips, padding], dim=2)  # (B, 3, T, H, W) -> (B, 3, 5, H, W)
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            activations = self.model.features(clips)  # (B, 1024, T', H', W')
        pooled = activations.float().mean(dim=(2, 3, 4))  # (B, 1024, T', H', W') -> (B, 1024)
        return F.normalize(pooled, dim=1)

    def info(self) -> dict[str, Any]:
        return {"encoder": self.encoder_id, "device": str(self.device), "dtype": str(self.autocast_dtype)}
