"""Model cards: the markdown descriptions of the registered model and of each of its versions.

Plain text built from what a version records, so it can be rebuilt at any time: its
metadata.json (what it was trained on: videos, codebook, tokenizer, encoder, decode settings)
and its evaluation metrics (the `eval.*` tags evaluate writes). videobert/registry.py writes the cards when
pretrain registers a version and rewrites the version's card when evaluate records its metrics.
"""

from __future__ import annotations

from typing import Any

VIDEOS_FRAME = (
    "videos = pd.DataFrame(\n"
    "    {\n"
    '        "video": ["s3://bucket/videos/cooking.mp4", "/data/videos/local.mp4"],\n'
    '        "start_s": [0.0, None],  # optional window in seconds; None: the whole video\n'
    '        "end_s": [30.0, None],\n'
    "    }\n"
    ")\n"
)
UNREADABLE_NOTE = (
    "A video that cannot be read (missing, not a video, over a `decode` bound) gets its reason in "
    "`error` and no {what}; the other rows are {done} all the same. S3 endpoint and region "
    "come from the model's `s3` settings or the AWS variables, credentials from the environment.\n"
)


def _load(model_uri: str) -> str:
    return f'import mlflow\nimport pandas as pd\n\nmodel = mlflow.pyfunc.load_model("{model_uri}")\n'


def predict_example(model_uri: str, video_input: bool = True) -> str:
    """A markdown snippet that loads `model_uri` and calls predict."""
    videos = (
        VIDEOS_FRAME
        + "out = model.predict(videos)  # per video: embedding, cls_embedding, visual_words, num_clips, error\n"
    )
    tokens = (
        "# token ids (joint vocabulary): embedding, cls_embedding, alignment_score, mlm_predictions, mlm_scores\n"
        'out = model.predict(pd.DataFrame({"input_ids": [[2, 17, 4, 3]]}))\n'
    )
    code = _load(model_uri) + "\n" + (videos + "\n" if video_input else "") + tokens
    notes = UNREADABLE_NOTE.format(what="embedding", done="embedded") if video_input else ""
    return f"```python\n{code}```\n\n{notes}"


def classifier_predict_example(model_uri: str) -> str:
    """A markdown snippet that loads the classifier `model_uri` and classifies videos."""
    code = (
        _load(model_uri)
        + "\n"
        + VIDEOS_FRAME
        + "out = model.predict(videos)  # per video: label, scores (one per class, in the logged order), error\n"
    )
    return f"```python\n{code}```\n\n" + UNREADABLE_NOTE.format(what="label", done="classified")


def _trained_on(metadata: dict[str, Any]) -> list[str]:
    lines = []
    videos = metadata.get("tokenized_videos")
    if videos is not None:
        holdout = metadata.get("holdout_fraction")
        held = f"; a {holdout:g} hash hold-out of them is kept out of training" if holdout else ""
        lines.append(f"- **Videos:** {videos} tokenized videos{held}.")
    if metadata.get("tokens_uri") or metadata.get("tokens_digest"):
        lines.append(
            f"- **Token shards:** `{metadata.get('tokens_uri', '?')}` "
            f"(digest `{metadata.get('tokens_digest', 'unknown')}`)."
        )
    lines.append(f"- **Codebook version:** `{metadata.get('codebook_version', 'unknown')}`.")
    lines.append(f"- **Tokenizer version:** `{metadata.get('tokenizer_version', 'unknown')}`.")
    encoder = metadata.get("encoder") or {}
    if encoder:
        kind = {
            "random": f"random weights, seed {encoder.get('seed')}, rebuilt on load",
            "file": "weights stored with the model",
            "missing": f"not carried: {encoder.get('reason')}",
        }.get(encoder.get("weights"), encoder.get("weights"))
        lines.append(f"- **Clip encoder:** `{encoder.get('encoder_id')}` ({kind}).")
    decode = metadata.get("decode") or {}
    if decode:
        seconds = decode["clip_frames"] / decode["fps"]
        lines.append(
            f"- **Clips:** {decode['clip_frames']} frames at {decode['fps']:g} fps ({seconds:.2f} s), "
            f"{decode['size']} px square."
        )
    return lines


def _evaluation(metrics: dict[str, float], eval_run_id: str | None) -> list[str]:
    if not metrics:
        return ["Not evaluated yet: `videobert evaluate` writes its metrics here (and as `eval.*` tags)."]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items())]
    if eval_run_id:
        lines += ["", f"Evaluation run: `{eval_run_id}` (report and plots under `evaluation/`)."]
    return lines


def version_card(
    name: str,
    version: str,
    metadata: dict[str, Any],
    metrics: dict[str, float] | None = None,
    eval_run_id: str | None = None,
) -> str:
    """The description of one version: what it was trained on (its metadata.json), how it scored
    (its evaluation metrics, when evaluated) and how to call it."""
    size, steps, run = metadata.get("model_size", "?"), metadata.get("steps", "?"), metadata.get("run_name")
    origin = f", continued from `{metadata['init_from']}`" if metadata.get("init_from") else ""
    video_input = (metadata.get("encoder") or {}).get("weights") in ("random", "file")
    kind = metadata.get("video_input", "tokens")
    kinds = {
        "tokens": "visual words (codebook ids) at video positions, as the paper",
        "features": "clip features through a projection at video positions, masked clips trained "
        "with a contrastive (InfoNCE) loss, as CBT; the visual words are not used",
        "both": "visual words plus projected clip features at video positions; cross-entropy and "
        "InfoNCE on masked clips",
    }
    head = [
        f"# {name} v{version}",
        "",
        f"A pretrained VideoBERT (`{size}` size, {steps} steps"
        + (f", run `{run}`" if run else "")
        + f"{origin}).",
        "",
        f"- **Video input (`video_input`):** `{kind}`: {kinds.get(kind, kind)}.",
        "",
        "## Trained on",
        "",
        *_trained_on(metadata),
        "",
        "## Evaluation",
        "",
        *_evaluation(metrics or {}, eval_run_id),
        "",
        "## Use",
        "",
    ]
    if not video_input:
        head += ["This version carries no clip encoder, so it takes token ids only.", ""]
    if kind != "tokens":
        head += [
            "It takes clip features: give it raw video (a `video` column); `input_ids` alone "
            "cannot feed its video positions.",
            "",
        ]
    return "\n".join(head) + "\n" + predict_example(f"models:/{name}/{version}", video_input)


def registered_model_card(name: str) -> str:
    """The description of the registered model (each version's own says what it was trained on)."""
    return (
        f"# {name}\n\n"
        "VideoBERT models pretrained by the videobert pipeline: raw videos (and narration) in object "
        "storage, S3D clip features, a hierarchical k-means codebook of visual words, then masked "
        "language modelling over text and visual words. Each version carries its weights, "
        "vocabulary, clip encoder, codebook, text tokenizer and decode settings, so `predict` takes "
        "raw video (a `video` column of local paths or `s3://` URIs, optional `start_s` / `end_s`) "
        "or token ids (an `input_ids` column).\n\n"
        "Aliases: `candidate` is the newest pretrained version; `champion` the best evaluated one "
        "(moved by `videobert promote`). Each version's description says what it was trained on "
        "(codebook and tokenizer versions, videos) and how it scored.\n\n"
        "## Use\n\n" + predict_example(f"models:/{name}@champion")
    )


def classifier_card(
    name: str,
    version: str,
    metadata: dict[str, Any],
    metrics: dict[str, float] | None = None,
    eval_run_id: str | None = None,
) -> str:
    """The description of one classifier version: the pretrained version it was built on, its
    classes and labelled clips, its test metrics next to the pretrained model's zero-shot ones."""
    info = metadata.get("classifier") or {}
    classes = list(info.get("classes") or [])
    shown = ", ".join(f"`{c}`" for c in classes[:40]) + (
        f" and {len(classes) - 40} more" if len(classes) > 40 else ""
    )
    mode = {"linear_probe": "a linear probe: the encoder frozen", "full": "fine-tuned end to end"}.get(
        info.get("mode"), info.get("mode")
    )
    clips = info.get("clips") or {}
    lines = [
        f"# {name} v{version}",
        "",
        f"A video classifier over {len(classes)} classes: a linear head on the video features of "
        f"`{info.get('pretrained_model', '?')}` ({mode}; {info.get('steps', '?')} steps).",
        "",
        f"**Classes:** {shown}.",
        "",
        "## Trained on",
        "",
        f"- **Labels:** `{info.get('labels_uri', '?')}` (digest `{info.get('labels_digest', 'unknown')}`): "
        f"{clips.get('train', '?')} train and {clips.get('test', '?')} test clips.",
        f"- **Input:** {info.get('input', '?')}.",
        f"- **Pretrained model:** `{info.get('pretrained_model', '?')}`, built on:",
        *(f"  {line}" for line in _trained_on(metadata)),
        "",
        "## Evaluation (test split)",
        "",
        "`zero_shot_*`: the pretrained model's template accuracy on the same test clips, before fine-tuning.",
        "",
        *_evaluation(metrics or {}, eval_run_id),
        "",
        "## Use",
        "",
    ]
    return "\n".join(lines) + "\n" + classifier_predict_example(f"models:/{name}/{version}")


def classifier_model_card(name: str) -> str:
    """The description of the registered classifiers (each version's own names its classes)."""
    return (
        f"# {name}\n\n"
        "Video classifiers made by `videobert finetune-classify`: a linear head on a pretrained "
        "VideoBERT's video features (its pooled video embedding, `finetune.pooled_features`, and the "
        "zero-shot template's [MASK] outputs, `finetune.template_features`), trained on a labelled table (`finetune.labels`). Each "
        "version carries the pretrained model's files (encoder, codebook, tokenizer, decode settings), "
        "its own weights and its class list, so `predict` takes raw video.\n\n"
        "Aliases: `candidate` is the newest version; `champion` the one with the best test top-1 "
        "(`eval.test_top1`). The `pretrained_model` tag of each version names the model it was built on.\n\n"
        "## Use\n\n" + classifier_predict_example(f"models:/{name}@champion")
    )


def captioner_predict_example(model_uri: str) -> str:
    """A markdown snippet that loads the captioner `model_uri` and captions videos."""
    code = (
        _load(model_uri) + "\n" + VIDEOS_FRAME + "out = model.predict(videos)  # per video: caption, error\n"
    )
    return f"```python\n{code}```\n\n" + UNREADABLE_NOTE.format(what="caption", done="captioned")


def captioner_card(
    name: str,
    version: str,
    metadata: dict[str, Any],
    metrics: dict[str, float] | None = None,
    eval_run_id: str | None = None,
) -> str:
    """The description of one captioner version: the pretrained version it was built on, the
    captions it was trained on, its held-out metrics next to the S3D-only and VideoBERT-only
    captioners trained beside it."""
    info = metadata.get("captioner") or {}
    segments = info.get("segments") or {}
    model = info.get("model") or {}
    lines = [
        f"# {name} v{version}",
        "",
        f"A video captioner: a transformer encoder-decoder ({model.get('layers', '?')} layers, hidden "
        f"{model.get('hidden', '?')}) over the `{info.get('feature_set', '?')}` features of "
        f"`{info.get('pretrained_model', '?')}` ({info.get('steps', '?')} steps; decoding: beam "
        f"{info.get('beam_size', '?')}, at most {info.get('max_caption_words', '?')} words).",
        "",
        "## Trained on",
        "",
        f"- **Captions:** `{info.get('captions_uri', '?')}` (digest `{info.get('captions_digest', 'unknown')}`): "
        f"{segments.get('train', '?')} train and {segments.get('test', '?')} test segments.",
        f"- **Features:** {info.get('input', '?')}.",
        f'- **Template:** "{info.get("template", "?")}".',
        f"- **Pretrained model:** `{info.get('pretrained_model', '?')}`, built on:",
        *(f"  {line}" for line in _trained_on(metadata)),
        "",
        "## Evaluation (held-out segments)",
        "",
        "`test_*`: this captioner; `s3d_*` / `videobert_*` / `videobert_s3d_*`: the three captioners "
        "trained side by side in the same run (pycocoevalcap, micro-averaged).",
        "",
        *_evaluation(metrics or {}, eval_run_id),
        "",
        "## Use",
        "",
    ]
    return "\n".join(lines) + "\n" + captioner_predict_example(f"models:/{name}/{version}")


def captioner_model_card(name: str) -> str:
    """The description of the registered captioners."""
    return (
        f"# {name}\n\n"
        "Video captioners made by `videobert finetune-caption` (the VideoBERT paper's §4.6): a "
        "transformer encoder-decoder over a pretrained VideoBERT's segment features (mean of the "
        "video-token outputs, mean of the masked template outputs) and the mean S3D clip feature, "
        "trained on a captions table (`finetune.captions`). Each version carries the pretrained "
        "model's files (encoder, codebook, tokenizer, decode settings), its own weights, caption "
        "words and decode settings, so `predict` takes raw video.\n\n"
        "Aliases: `candidate` is the newest version; `champion` the one with the best held-out CIDEr "
        "(`eval.test_cider`). The `pretrained_model` tag of each version names the model it was built on.\n\n"
        "## Use\n\n" + captioner_predict_example(f"models:/{name}@champion")
    )
