"""`videobert finetune-caption`: a video captioner on a pretrained VideoBERT (the paper's §4.6),
registered as its own model (`finetune.captioner_name`, default `videobert-captioner`).

    videobert finetune-caption --config configs/demo.yaml [--set finetune.captioner.steps=500]

1. `finetune.model_uri` (default the pretrained champion) is resolved to one version, and
   `finetune.captions` is read and split (videobert/captioning.py).
2. Nothing more happens when the captioners' candidate was built on that version, that table
   (its rows and its videos' ETags) and these settings: a rerun trains and writes nothing.
3. The table's videos get their own tables with extract's code (pipelines/labelled_sets.py, as
   finetune-classify's): each segment's clip features and visual words (the pretrained
   model's codebook) come from them; a video that cannot be read is named and left out.
4. One Ray Train run (TorchTrainer, one worker, on a GPU when the cluster has one) computes the
   segments' features once and trains the three captioners side by side: S3D only, VideoBERT,
   VideoBERT + S3D. Rank 0 logs `<set>_loss` every `finetune.log_every` steps. One worker
   group for the three, so its start-up is paid once.
5. The driver scores each captioner's held-out captions with pycocoevalcap (BLEU-3/4, METEOR,
   ROUGE-L, CIDEr; `<set>_<metric>` metrics, the registered one's also as `test_<metric>`) and
   the share that name the segment's `object`; the comparison table, sample captions and the
   loss curves go to the run. The VideoBERT + S3D captioner is registered as `candidate` with
   its metrics as `eval.*` tags, its lineage and a model card; `champion` moves when its test
   CIDEr beats the champion's (`registry.promote`).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

from pipelines.common import init_ray, stage_main
from pipelines.labelled_sets import already_built, evaluate_and_promote, extract_labelled, finetune_inputs
from videobert.config import ConfigError, ExperimentConfig, redact
from videobert.results import FinetuneResult

if TYPE_CHECKING:
    from videobert.captioning import CaptionedSegment, CaptionScorer, TrainedCaptioners

log = logging.getLogger("videobert.finetune_caption")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker: `train_captioners`, then its captioners as the run's checkpoint."""
    import ray.train

    from videobert.captioning import save_trained, train_captioners

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank = ray.train.get_context().get_world_rank()
    trained = train_captioners(loop_config["task"], log_metrics=rank == 0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_trained(trained, tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"steps": trained.steps}, checkpoint=checkpoint)


def caption_metrics(
    trained: TrainedCaptioners, test: list[CaptionedSegment], scorer: CaptionScorer
) -> tuple[dict[str, float], dict[str, str]]:
    """`<set>_<metric>` of every captioner on the test segments (all the captions of a segment's
    window in the table are its references), `<set>_object_named` when the table has objects,
    and metric -> why for those that could not be computed."""
    from videobert.captioning import METRIC_NAMES, object_named_rate

    references: dict[str, list[str]] = {}
    key_of = []
    for segment in test:
        key = segment.name
        references.setdefault(key, []).append(segment.caption)
        key_of.append(key)
    metrics: dict[str, float] = {}
    missing: dict[str, str] = {}
    sets = {
        name: dict(zip(key_of, captions, strict=True)) for name, captions in trained.test_captions.items()
    }
    for name, scores in scorer.score(references, sets).items():  # one window, one caption
        captions = trained.test_captions[name]
        metrics |= {f"{name}_{m}": scores.metrics[m] for m in METRIC_NAMES if m in scores.metrics}
        missing |= {f"{name}_{m}": why for m, why in scores.missing.items()}
        named = object_named_rate(captions, [s.object for s in test])
        if named is not None:
            metrics[f"{name}_object_named"] = named
    return metrics, missing


def comparison_table(metrics: dict[str, float], feature_sets: list[str]) -> str:
    """The paper's comparison: one row per feature set, one column per metric (markdown)."""
    from videobert.captioning import LABELS, METRIC_NAMES

    columns = [m for m in (*METRIC_NAMES, "object_named") if any(f"{s}_{m}" in metrics for s in feature_sets)]
    heads = {"bleu3": "BLEU-3", "bleu4": "BLEU-4", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr"}
    lines = ["| features | " + " | ".join(heads.get(c, c) for c in columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    for name in feature_sets:
        cells = [f"{metrics[f'{name}_{c}']:.4f}" if f"{name}_{c}" in metrics else "n/a" for c in columns]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def record_run(
    run_id: str,
    metrics: dict[str, float],
    missing: dict[str, str],
    trained: TrainedCaptioners,
    test: list[CaptionedSegment],
    unreadable: dict[str, str],
    notes: dict[str, str],
) -> None:
    """The run's metrics, comparison table (markdown and JSON), sample captions, loss curves and
    unreadable segments."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from videobert.captioning import FEATURE_SETS
    from videobert.tracking import log_loss_curve

    client = MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    sets = [s for s in FEATURE_SETS if s in trained.test_captions]
    table = comparison_table(metrics, sets)
    report = "# Captioning on the held-out segments\n\n"
    report += "".join(f"- **{k}**: {v}\n" for k, v in notes.items())
    report += "\n" + table
    if missing:
        report += "\nNot computed: " + "; ".join(f"`{k}`: {v}" for k, v in missing.items()) + "\n"
    client.log_text(run_id, report, "captioning/report.md")
    client.log_text(
        run_id, json.dumps({"metrics": metrics, "missing": missing}, indent=1), "captioning/comparison.json"
    )
    samples = [
        {"segment": s.name, "reference": s.caption, **{name: trained.test_captions[name][i] for name in sets}}
        for i, s in enumerate(test)
    ]
    client.log_text(run_id, json.dumps(samples, indent=1), "captioning/samples.json")
    client.log_text(run_id, json.dumps(unreadable, indent=1), "captioning/unreadable.json")
    log_loss_curve(
        run_id, tuple(f"{s}_loss" for s in sets), "Captioner training", "captioning/loss_curve.png"
    )


def train(config: ExperimentConfig, task: Any, run_name: str) -> TrainedCaptioners:
    """The captioners' Ray Train run (one worker; a GPU when the cluster has one)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from videobert import storage
    from videobert.captioning import load_trained
    from videobert.tables import Layout

    storage_fs, storage_path = storage.arrow_location(
        config.train.storage_path or Layout(config.output).train, config.s3
    )
    use_gpu = bool(ray.cluster_resources().get("GPU", 0))
    # Two CPUs: torch then runs two threads (Ray sets OMP_NUM_THREADS from them), which nearly
    # halves the demo's training time on a 2-core machine.
    resources = {"CPU": 2.0, "GPU": 1.0} if use_gpu else {"CPU": 2.0}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": task},
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"finetune-caption run {run_name} ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        return load_trained(directory)


def run(config: ExperimentConfig) -> FinetuneResult:
    """Fine-tune, score and register a captioner (see the module doc)."""
    import mlflow
    from mlflow import MlflowClient

    from videobert import captioning as cap
    from videobert.captioner import register_captioner
    from videobert.classification import TEST, TRAIN, labels_digest, window_clips
    from videobert.classifier import LINEAGE_TAG
    from videobert.evaluation import unreadable_labelled_videos
    from videobert.model_card import captioner_card, captioner_model_card
    from videobert.tables import Layout
    from videobert.tracking import start_or_resume_run, use_tracking_uri

    settings, name = config.finetune, config.finetune.captioner_name
    if not settings.captions:
        raise ConfigError(
            "finetune.captions is not set: name a CSV or Parquet table with source_uri, start_s, end_s "
            "and caption (README: Fine-tuning a captioner)"
        )
    segments = cap.read_captions_table(settings.captions, config)
    inputs = finetune_inputs(config, settings.captions)
    pretrained, plan = inputs.pretrained, inputs.plan
    client = MlflowClient()
    trained_on = {
        LINEAGE_TAG: pretrained.uri,
        "captions_digest": labels_digest(segments, plan.videos),
        "caption_digest": cap.caption_digest(settings),
    }
    done = already_built(config, "finetune-caption", name, trained_on, pretrained.uri)
    if done is not None:
        return done

    init_ray()
    started = time.perf_counter()
    extract_labelled(config, plan, inputs.encoder, "finetune-caption", settings.captions)
    unreadable = unreadable_labelled_videos(config, plan, labels=settings.captions)
    words, features, empty = window_clips(config, settings.captions, segments, inputs.codebook_uri)
    unreadable |= empty
    for uri, reason in unreadable.items():
        log.warning("captioned segment left out: %s: %s", uri, reason)
    train_set = [s for s in segments if s.split == TRAIN and s.row in words]
    test = [s for s in segments if s.split == TEST and s.row in words]
    if not train_set or not test:
        raise ConfigError(
            f"finetune.captions {settings.captions}: no readable {TEST if train_set else TRAIN} segment "
            f"({len(unreadable)} left out: {', '.join(list(unreadable)[:3])})"
        )
    vocab = cap.CaptionVocab.build([s.caption for s in train_set], settings.captioner.min_word_count)
    meta = pretrained.metadata
    run_name = (
        f"{config.name}-caption-{trained_on['captions_digest'][:8]}-{trained_on['caption_digest'][:8]}"
        f"-from-{pretrained.name}-v{pretrained.version}"
    )
    run_id, _ = start_or_resume_run(config, run_name, stage="finetune-caption")
    for key, value in {**trained_on, "captions_uri": settings.captions, "captioner_name": name}.items():
        client.set_tag(run_id, key, redact(value))
    task = cap.CaptionTask(
        settings=settings,
        model_uri=pretrained.uri,
        tokenizer_uri=meta.get("tokenizer_uri") or Layout(config.output).tokenizer(meta["tokenizer_version"]),
        s3=config.s3,
        tracking_uri=mlflow.get_tracking_uri(),
        run_id=run_id,
        vocab=vocab.words,
        train_words=[words[s.row] for s in train_set],
        train_s3d=[features[s.row] for s in train_set],
        train_captions=[s.caption for s in train_set],
        test_words=[words[s.row] for s in test],
        test_s3d=[features[s.row] for s in test],
    )
    prepared = time.perf_counter() - started
    log.info("training on %d segments (%.1f s to prepare them)", len(train_set), prepared)
    uri = mlflow.get_tracking_uri()
    with cap.CaptionScorer() as scorer:  # METEOR's Java loads while the captioners train
        trained = train(config, task, run_name)
        use_tracking_uri(uri)  # Ray Train may have re-pointed MLflow in this process
        trained_s = time.perf_counter() - started - prepared
        log.info(
            "trained (%.1f s; %s)", trained_s, ", ".join(f"{k} {v:.1f} s" for k, v in trained.seconds.items())
        )
        metrics, missing = caption_metrics(trained, test, scorer)
    for metric in (*cap.METRIC_NAMES, "object_named"):
        if f"{cap.REGISTERED}_{metric}" in metrics:
            metrics[f"test_{metric}"] = metrics[f"{cap.REGISTERED}_{metric}"]
    if metrics.get("s3d_cider", 0) > 0:
        metrics["cider_ratio_to_s3d"] = metrics["test_cider"] / metrics["s3d_cider"]
    metrics |= {"train_segments": float(len(train_set)), "test_segments": float(len(test))}
    metrics |= {"unreadable_segments": float(len(unreadable)), "train_seconds": trained_s}
    notes = {
        "pretrained model": pretrained.uri,
        "captions": redact(settings.captions),
        "pretrained weights": "frozen" if settings.captioner.freeze_pretrained else "fine-tuned",
    }
    record_run(run_id, metrics, missing, trained, test, unreadable, notes)
    info = {
        "pretrained_model": pretrained.uri,
        "steps": settings.captioner.steps,
        "captions_uri": settings.captions,
        "captions_digest": trained_on["captions_digest"],
        "segments": {"train": len(train_set), "test": len(test)},
        "input": "mean of the video tokens' and of the template's [MASK] last hidden states "
        "([CLS] template [>] video [SEP]), and the mean S3D clip feature",
        "freeze_pretrained": settings.captioner.freeze_pretrained,
        "run_id": run_id,
    }
    version = register_captioner(
        run_id,
        config,
        pretrained,
        cap.REGISTERED,
        trained.states[cap.REGISTERED],
        trained.settings[cap.REGISTERED],
        vocab,
        trained.encoder,
        info,
        trained_on,
    )
    decision = evaluate_and_promote(
        name, version, run_id, metrics, cap.METRIC, captioner_card, captioner_model_card(name)
    )
    log.info("registered %s v%s (%.1f s in all)", name, version, time.perf_counter() - started)
    verdict = "promoted to champion" if decision.promoted else "kept the current champion"
    ratio = metrics.get("cider_ratio_to_s3d")
    print(
        f"finetune-caption: {name} v{version} on {pretrained.uri}: test CIDEr {metrics['test_cider']:.3f} "
        f"(S3D only {metrics['s3d_cider']:.3f}, VideoBERT only {metrics['videobert_cider']:.3f}"
        + (f", ratio {ratio:.2f}" if ratio is not None else "")
        + f") on {len(test)} test segments; {verdict} ({decision.reason})"
    )
    return FinetuneResult(
        name, version, pretrained.uri, run_id, metrics, decision.promoted, unreadable=unreadable
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("finetune-caption", run, argv)


if __name__ == "__main__":
    sys.exit(main())
