"""The registered captioner: a pretrained VideoBERT version plus a trained caption model (the
VideoBERT + S3D features' one), as its own MLflow registered model (`finetune.captioner_name`,
default `videobert-captioner`).

A version's artifacts are plain files (safetensors and JSON; nothing pickled but the pyfunc
class, by reference), laid out as the classifier's (videobert/classifier.py):

    videobert/    the pretrained version's files; with `freeze_pretrained: false`
                  model.safetensors holds the fine-tuned VideoBERT. metadata.json is the
                  pretrained version's plus `captioner` (what it was trained on, the lineage)
    inputs/       the pretrained version's input files (S3D encoder or "random", codebook,
                  tokenizer, decode and s3 settings: videobert/model_inputs.py)
    captioner/    captioner.safetensors (the encoder-decoder), vocab.json (caption words) and
                  captioner.json (its shape, feature set, template and decode settings:
                  beam size, caption length)

`predict` takes a DataFrame with a `video` column (local paths or s3:// URIs) and optional
`start_s` / `end_s`, and returns per row `caption` and `error`: the pretrained version's video
chain (decode, S3D, codebook: the encoder is checked to be the registered one) gives the
window's clip features and visual words, then the features of videobert/captioning.py and the
captioner's beam search. A video that cannot be read gets its reason in `error` and no
caption; the batch goes on.

Aliases: `candidate` on each new version; `champion` moved by `registry.promote` on
`eval.test_cider` (strictly higher wins). The version's `pretrained_model` tag names the
pretrained version it was built on; `captions_digest` and `caption_digest` say what it was
trained on, so a rerun over the same inputs trains nothing (`registry.already_trained`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from videobert.captioning import (
    FEATURE_SETS,
    CaptionModel,
    CaptionVocab,
    decode_captions,
    feature_matrix,
    s3d_means,
    segment_parts,
)
from videobert.classifier import fine_tuned_files, tag_candidate
from videobert.config import ExperimentConfig, redact
from videobert.registry import VideoBertPyfunc, log_pyfunc, video_input_example, video_requests

if TYPE_CHECKING:
    from videobert.registry import ModelVersionInfo

CAPTIONER_FILES_DIR = "captioner"
WEIGHTS_FILE = "captioner.safetensors"
VOCAB_FILE = "vocab.json"
SETTINGS_FILE = "captioner.json"
OUTPUT_COLUMNS = ("caption", "error")


def save_captioner(
    state: dict[str, torch.Tensor], vocab: CaptionVocab, settings: dict[str, Any], directory: Path
) -> None:
    """captioner/: weights, caption words and `settings` (model shape, feature set, decoding)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / WEIGHTS_FILE))
    (directory / VOCAB_FILE).write_text(vocab.to_json())
    (directory / SETTINGS_FILE).write_text(redact(json.dumps(settings, indent=2)))


def load_captioner(directory: str | Path) -> tuple[CaptionModel, CaptionVocab, dict[str, Any]]:
    """The captioner (eval mode, CPU), its words and settings, from captioner/."""
    from safetensors.torch import load_file

    directory = Path(directory)
    settings = json.loads((directory / SETTINGS_FILE).read_text())
    model = CaptionModel.from_settings(settings["model"])
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model.eval(), CaptionVocab.from_json((directory / VOCAB_FILE).read_text()), settings


class VideoCaptionerPyfunc(VideoBertPyfunc):
    """`predict(DataFrame with video[, start_s, end_s])` -> caption, error (module doc)."""

    def load_context(self, context: Any) -> None:
        super().load_context(context)
        self.captioner, self.caption_vocab, self.settings = load_captioner(
            context.artifacts[CAPTIONER_FILES_DIR]
        )

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if "video" not in model_input.columns:
            raise ValueError(
                f"expected a `video` column (local paths or s3:// URIs), optionally start_s / end_s; "
                f"got {sorted(model_input.columns)}"
            )
        videos, errors = video_requests(model_input)
        captions: dict[str, str] = {}
        if videos:
            captions, failed = self._caption(videos)
            errors |= failed
        rows = [str(i) for i in range(len(model_input))]
        return pd.DataFrame(
            {
                "caption": pd.Series([captions.get(r) for r in rows], dtype=object),
                "error": pd.Series([None if r in captions else errors.get(r) for r in rows], dtype=object),
            }
        )

    def _caption(self, videos: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, str]]:
        """video_id -> caption for the videos read, video_id -> why for the others."""
        from videobert.videos import ClipFeatures, decoded_videos_here

        embedder = self._video_embedder()  # the registered encoder (checked) and codebook
        words_stage = embedder.words

        def features_stage(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return ClipFeatures.__call__(words_stage, batch)  # features kept: S3D is an input too

        words, features, errors = {}, {}, {}
        assert self.inputs is not None
        for video in decoded_videos_here(
            videos, self.inputs.decode, self.inputs.s3, features_stage, embedder.clips_per_batch
        ):
            if video.error:
                errors[video.video_id] = video.error
                continue
            clips = np.stack([np.asarray(c["feature"]) for c in video.ordered_clips()]).astype(np.float16)
            features[video.video_id] = clips
            words[video.video_id] = np.asarray(words_stage.codebook.assign(clips), np.int64)
        captions = {}
        if words:
            ids = list(words)
            try:
                captions = dict(
                    zip(
                        ids,
                        self.caption_segments([words[i] for i in ids], [features[i] for i in ids]),
                        strict=True,
                    )
                )
            except Exception as error:  # every video of the batch gets the error, none raises
                errors.update({i: f"caption: {type(error).__name__}: {error}" for i in ids})
        return captions, errors

    @torch.no_grad()
    def caption_segments(self, words: list[np.ndarray], features: list[np.ndarray]) -> list[str]:
        """Captions of segments given as visual words and clip features [clips, dim] (float16)."""
        from videobert.embedding import embedding_max_len

        text, masks = self.template_ids(self.settings["template"])
        model = self.model.eval()
        video, masked = segment_parts(
            model, self.vocab, text, masks, words, embedding_max_len(model, self.metadata)
        )
        parts = {"video": video.cpu(), "text": masked.cpu(), "s3d": s3d_means(features)}
        inputs = feature_matrix(parts, self.settings["feature_set"])[0]
        ids = decode_captions(
            self.captioner, inputs, int(self.settings["max_caption_words"]), int(self.settings["beam_size"])
        )
        return [self.caption_vocab.decode(i) for i in ids]


def captioner_signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = [ColSpec("string", "video")]
    inputs += [ColSpec("double", "start_s", required=False), ColSpec("double", "end_s", required=False)]
    outputs = [ColSpec("string", "caption", required=False), ColSpec("string", "error", required=False)]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def register_captioner(
    run_id: str,
    config: ExperimentConfig,
    pretrained: ModelVersionInfo,
    feature_set: str,
    state: dict[str, torch.Tensor],
    model_settings: dict[str, Any],
    vocab: CaptionVocab,
    encoder: dict[str, torch.Tensor] | None,
    info: dict[str, Any],
    tags: dict[str, str],
) -> str:
    """Log and register a captioner version (module doc) as `candidate`, with `tags` (lineage
    and what it was trained on) and `info` in metadata.json and captioner.json; returns it."""
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {feature_set!r}")
    cap = config.finetune.captioner
    name = config.finetune.captioner_name
    settings = {
        "model": model_settings,
        "feature_set": feature_set,
        "parts": list(FEATURE_SETS[feature_set]),
        "template": cap.template,
        "beam_size": cap.beam_size,
        "max_caption_words": cap.max_caption_words,
        **info,
    }
    with tempfile.TemporaryDirectory() as tmp:
        metadata = {**pretrained.metadata, "captioner": settings}
        artifacts = fine_tuned_files(config, pretrained, encoder, metadata, Path(tmp))
        save_captioner(state, vocab, settings, Path(tmp) / CAPTIONER_FILES_DIR)
        artifacts[CAPTIONER_FILES_DIR] = str(Path(tmp) / CAPTIONER_FILES_DIR)
        version = log_pyfunc(
            run_id, VideoCaptionerPyfunc(), artifacts, captioner_signature(), video_input_example(), name
        )
    tag_candidate(name, version, tags)
    return version
