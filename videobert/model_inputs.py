"""A registered model's input side: what turns raw video into its visual words (and text into
its text ids), carried by every version so that the model needs nothing but itself.

Written at registration (`write_model_inputs`) as the pyfunc's `inputs/` artifact, next to the
model's own `videobert/` files, and read by its video interface (`ModelInputs`):

    encoder.json           how to rebuild the S3D clip encoder: encoder_id, weights (`file`,
                           `random` or `missing`), seed, dtype, clips_per_batch, state_sha256, reason
    encoder.safetensors    the S3D state dict, when weights is `file` (kinetics400 or a state dict)
    decode.json            the `decode` config section: fps, clip length, size and every bound
    s3.json                the `s3` config section (endpoint, region); credentials: environment only
    codebook/              centroids.safetensors + codebook.json, as fit-codebook wrote them
    tokenizer/             tokenizer.json, vocab.txt, meta.json, as tokenize wrote them

Random S3D weights (`encoder.weights: none`) are not stored: `features.build_s3d` rebuilds them
from the seed on torch's forked CPU generator, the same tensors wherever torch and torchvision
are the same versions. `state_sha256` (of the encoder built at registration) is checked on load,
so an environment that builds other weights is refused instead of giving other visual words.
The encoder is `missing` when the codebook was not fit on the config's encoder's features
(another encoder, or none recorded, as for synthetic test features) or when its weights cannot
be read at registration: such a version takes token ids only. Only tensors are stored, as safetensors; nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from videobert import storage
from videobert.config import DecodeConfig, EncoderConfig, ExperimentConfig, S3Config, redact

if TYPE_CHECKING:
    from videobert.embedding import VideoFileEmbedder
    from videobert.model import JointVocab, VideoBert

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.json"
ENCODER_WEIGHTS_FILE = "encoder.safetensors"
DECODE_FILE = "decode.json"
S3_FILE = "s3.json"
CODEBOOK_DIR = "codebook"
TOKENIZER_DIR = "tokenizer"
FILE, RANDOM, MISSING = "file", "random", "missing"  # encoder.json `weights`


def state_sha256(module: torch.nn.Module) -> str:
    """A digest of a module's parameters and buffers (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _copy_files(uri: str, names: tuple[str, ...], directory: Path, s3: S3Config) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(storage.read_bytes(storage.join(uri, name), s3))


def _write_encoder(
    directory: Path, encoder: EncoderConfig, s3: S3Config, fitted_on: list[str]
) -> dict[str, Any]:
    """encoder.json (and encoder.safetensors for stored weights); returns encoder.json's content."""
    from videobert.features import EncoderWeightsError, build_s3d, encoder_id

    identity = encoder_id(encoder)
    meta: dict[str, Any] = {
        "encoder_id": identity,
        "name": encoder.name,
        "seed": encoder.seed,
        "dtype": encoder.dtype,
        "clips_per_batch": encoder.clips_per_batch,
        "torch": torch.__version__,  # random weights are rebuilt by this torch's generator
    }
    if identity not in fitted_on:
        # Words from another encoder's features would mean nothing to the model: no video input.
        fitted = f"was fit on {', '.join(fitted_on)} features" if fitted_on else "records no encoder"
        meta.update(
            weights=MISSING, reason=f"the codebook {fitted}, and the encoder section gives {identity}"
        )
    else:
        try:
            model = build_s3d(encoder, s3)
        except EncoderWeightsError as error:
            meta.update(weights=MISSING, reason=str(error))
        else:
            meta.update(
                weights=RANDOM if encoder.weights == "none" else FILE, state_sha256=state_sha256(model)
            )
            if meta["weights"] == FILE:
                from safetensors.torch import save_file

                state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
                save_file(state, str(directory / ENCODER_WEIGHTS_FILE))
    if meta["weights"] == MISSING:
        log.warning("the registered model takes no raw video: %s", meta["reason"])
    (directory / ENCODER_FILE).write_text(redact(json.dumps(meta, indent=2)))
    return meta


def write_model_inputs(
    directory: Path, config: ExperimentConfig, codebook_uri: str, tokenizer_uri: str | None
) -> dict[str, Any]:
    """Write a version's input files into `directory` (see the module doc); returns encoder.json's
    content. The codebook and tokenizer are copied from where the pipeline wrote them."""
    from videobert.codebook import CENTROIDS_FILE, METADATA_FILE, fitted_encoders
    from videobert.text_tokenizer import META_FILE, TOKENIZER_FILE, VOCAB_FILE

    directory.mkdir(parents=True, exist_ok=True)
    _copy_files(codebook_uri, (CENTROIDS_FILE, METADATA_FILE), directory / CODEBOOK_DIR, config.s3)
    if tokenizer_uri:
        files = (TOKENIZER_FILE, VOCAB_FILE, META_FILE)
        _copy_files(tokenizer_uri, files, directory / TOKENIZER_DIR, config.s3)
    codebook_meta = json.loads((directory / CODEBOOK_DIR / METADATA_FILE).read_text())
    (directory / DECODE_FILE).write_text(json.dumps(dataclasses.asdict(config.decode), indent=2))
    (directory / S3_FILE).write_text(redact(json.dumps(dataclasses.asdict(config.s3), indent=2)))
    return _write_encoder(directory, config.encoder, config.s3, fitted_encoders(codebook_meta))


@dataclass(frozen=True)
class ModelInputs:
    """A version's input files, read back (see the module doc)."""

    root: Path
    encoder: dict[str, Any]
    """encoder.json."""
    decode: DecodeConfig
    s3: S3Config

    @classmethod
    def load(cls, root: str | Path) -> ModelInputs:
        root = Path(root)
        return cls(
            root=root,
            encoder=json.loads((root / ENCODER_FILE).read_text()),
            decode=DecodeConfig(**json.loads((root / DECODE_FILE).read_text())),
            s3=S3Config(**json.loads((root / S3_FILE).read_text())),
        )

    @property
    def codebook_uri(self) -> str:
        return str(self.root / CODEBOOK_DIR)

    @property
    def tokenizer_uri(self) -> str | None:
        return str(self.root / TOKENIZER_DIR) if (self.root / TOKENIZER_DIR).is_dir() else None

    def encoder_config(self) -> EncoderConfig:
        """The encoder section that rebuilds the registered encoder; ValueError when it has none."""
        weights = self.encoder["weights"]
        if weights == MISSING:
            raise ValueError(
                f"this model version carries no video encoder ({self.encoder.get('reason')}); "
                "it takes token ids (an `input_ids` column) only"
            )
        return EncoderConfig(
            name=self.encoder["name"],
            weights="none" if weights == RANDOM else str(self.root / ENCODER_WEIGHTS_FILE),
            seed=int(self.encoder["seed"]),
            clips_per_batch=int(self.encoder["clips_per_batch"]),
            dtype=self.encoder["dtype"],
        )

    def video_embedder(self, model: VideoBert, vocab: JointVocab, max_len: int) -> VideoFileEmbedder:
        """Raw video -> embeddings with this version's encoder, codebook and decode settings,
        once the rebuilt encoder is checked to be the registered one."""
        from videobert.embedding import VideoFileEmbedder

        embedder = VideoFileEmbedder(
            model, vocab, max_len, self.encoder_config(), self.decode, self.codebook_uri, self.s3
        )
        built = state_sha256(embedder.words.encoder.model)
        if built != self.encoder["state_sha256"]:
            raise ValueError(
                f"the S3D encoder built here (sha256 {built[:12]}) is not the registered "
                f"{self.encoder['encoder_id']} ({self.encoder['state_sha256'][:12]}); random weights are "
                f"rebuilt from seed {self.encoder['seed']}, so use torch {self.encoder.get('torch')} "
                f"as at registration (this is {torch.__version__})"
            )
        return embedder
