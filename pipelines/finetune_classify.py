"""`videobert finetune-classify`: a video classifier on a pretrained VideoBERT, registered as
its own model (`finetune.classifier_name`, default `videobert-classifier`).

    videobert finetune-classify --config configs/demo.yaml [--set finetune.steps=300]

1. `finetune.model_uri` (default the pretrained champion) is resolved to one version, and
   `finetune.labels` is read and split (videobert/classification.py).
2. Nothing more happens when the classifiers' candidate was built on that version, that table
   (its rows and its videos' ETags) and these settings: a rerun trains and writes nothing.
3. The table's videos get their own tables with extract's code (pipelines/labelled_sets.py, as
   evaluate's labelled set): extract's features of a video under `source` are copied, any other
   video is decoded and encoded. Each clip's visual words are its features through the
   pretrained model's codebook; a video that cannot be read is named and left out.
4. Training and test scoring run in one Ray task, on a GPU when the cluster has one (see
   `run`); rank 0 is that task, and it logs `loss` every `finetune.log_every` steps.
5. The MLflow run gets the params, the test metrics (top-1/top-5, and the pretrained model's
   zero-shot accuracy on the same clips next to them, asked in the words of the version's own
   evaluation: its `zero_shot_prefix` tag), the confusion plots and a report. The
   classifier is registered as `candidate` with its metrics as `eval.*` tags, its lineage and a
   model card; `champion` moves when its test top-1 beats the champion's (`registry.promote`).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.common import init_ray, stage_main
from pipelines.labelled_sets import already_built, evaluate_and_promote, extract_labelled, finetune_inputs
from videobert.config import ConfigError, ExperimentConfig, redact
from videobert.results import FinetuneResult

if TYPE_CHECKING:
    from videobert.classification import FinetuneTask, LabelledClip, TrainedClassifier
    from videobert.evaluation import EvalSetPlan

log = logging.getLogger("videobert.finetune_classify")


def record_run(
    run_id: str,
    metrics: dict[str, float],
    classes: list[str],
    confusions: dict[str, np.ndarray],
    unreadable: dict[str, str],
    notes: dict[str, str],
) -> None:
    """The run's test metrics, confusion plots, report, class list and unreadable clips."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from videobert import reports

    client = MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    with tempfile.TemporaryDirectory() as tmp:
        plots = {}
        for title, matrix in confusions.items():
            file = Path(tmp) / f"{title.lower().replace(' ', '_').replace('-', '_')}.png"
            reports.plot_confusion(matrix, classes, file, title)
            client.log_artifact(run_id, str(file), "classification")
            plots[title] = file.name
        report = reports.markdown_report("Classification on the test split", metrics, notes, plots)
        client.log_text(run_id, report, "classification/report.md")
    client.log_text(run_id, json.dumps(classes, indent=1), "classification/classes.json")
    client.log_text(run_id, json.dumps(unreadable, indent=1), "classification/unreadable.json")


def prepare_clips(
    config: ExperimentConfig, clips: list[LabelledClip], plan: EvalSetPlan, encoder: str, codebook_uri: str
) -> tuple[dict[int, np.ndarray], dict[str, str]]:
    """Extract the table's videos not done yet (its own tables, extract's code), then each clip's
    visual words by the pretrained codebook: row -> words, and clip -> why for those left out."""
    from videobert.classification import clip_words
    from videobert.evaluation import unreadable_labelled_videos

    labels = config.finetune.labels
    extract_labelled(config, plan, encoder, "finetune-classify", labels)
    unreadable = unreadable_labelled_videos(config, plan, labels=labels)
    words, empty = clip_words(config, clips, codebook_uri)
    unreadable |= empty
    for uri, reason in unreadable.items():
        log.warning("labelled clip left out: %s: %s", uri, reason)
    return words, unreadable


def train_task(task: FinetuneTask) -> TrainedClassifier:
    """`train_classifier` in its Ray task, with its per-step log lines shown on the driver."""
    from videobert.classification import train_classifier

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return train_classifier(task)


def run_metrics(
    trained: TrainedClassifier, test: list[LabelledClip], classes: list[str]
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Test top-1/top-5 of the classifier and of zero-shot on the same clips, and both confusions."""
    from videobert.classification import classification_metrics
    from videobert.metrics import top_k_accuracy

    targets = np.asarray([classes.index(c.label) for c in test])
    metrics, confusion = classification_metrics("test", trained.test_scores, targets, len(classes))
    zero_shot, zero_shot_confusion = classification_metrics(
        "zero_shot", trained.zero_shot_scores, targets, len(classes)
    )
    metrics |= zero_shot | trained.zero_shot_metrics | trained.train_metrics
    metrics["head_top1"] = top_k_accuracy(trained.head_scores, targets, 1)  # the head alone
    metrics["chance"] = 1.0 / len(classes)
    return metrics, {"Classifier": confusion, "Zero-shot template": zero_shot_confusion}


def run(config: ExperimentConfig) -> FinetuneResult:
    """Fine-tune, score and register a classifier (see the module doc)."""
    import mlflow
    import ray
    from mlflow import MlflowClient

    from videobert import classification as cls
    from videobert.classifier import LINEAGE_TAG, register_classifier
    from videobert.evaluation import PREFIX_TAG, ZERO_SHOT_PREFIX, zero_shot_template
    from videobert.model_card import classifier_card, classifier_model_card
    from videobert.tables import Layout
    from videobert.tracking import start_or_resume_run

    settings, name = config.finetune, config.finetune.classifier_name
    if not settings.labels:
        raise ConfigError(
            "finetune.labels is not set: name a CSV or Parquet table with source_uri and label "
            "(README: Fine-tuning a classifier)"
        )
    clips = cls.read_classification_table(settings.labels, config)
    inputs = finetune_inputs(config, settings.labels)
    pretrained, encoder, codebook_uri, plan = (
        inputs.pretrained,
        inputs.encoder,
        inputs.codebook_uri,
        inputs.plan,
    )
    client = MlflowClient()
    # zero-shot and the head's template ask in the words the version's own evaluation used
    prefix = client.get_model_version(pretrained.name, pretrained.version).tags.get(PREFIX_TAG)
    prefix = prefix or ZERO_SHOT_PREFIX
    trained_on = {
        LINEAGE_TAG: pretrained.uri,
        "labels_digest": cls.labels_digest(clips, plan.videos),
        "finetune_digest": cls.finetune_digest(settings),
        PREFIX_TAG: prefix,
    }
    done = already_built(config, "finetune-classify", name, trained_on, pretrained.uri)
    if done is not None:
        return done

    init_ray()
    started = time.perf_counter()
    words, unreadable = prepare_clips(config, clips, plan, encoder, codebook_uri)
    classes = cls.classes_of(clips)
    train = [(words[c.row], classes.index(c.label)) for c in clips if c.split == cls.TRAIN and c.row in words]
    test = [c for c in clips if c.split == cls.TEST and c.row in words]
    if not train or not test:
        raise ConfigError(
            f"finetune.labels {settings.labels}: no readable {cls.TEST if train else cls.TRAIN} clip "
            f"({len(unreadable)} left out: {', '.join(list(unreadable)[:3])})"
        )

    meta = pretrained.metadata
    run_name = (
        f"{config.name}-finetune-{trained_on['labels_digest'][:8]}-{trained_on['finetune_digest'][:8]}"
        f"-from-{pretrained.name}-v{pretrained.version}"
    )
    run_id, _ = start_or_resume_run(config, run_name, stage="finetune-classify")
    for key, value in {**trained_on, "labels_uri": settings.labels, "classifier_name": name}.items():
        client.set_tag(run_id, key, redact(value))
    task = cls.FinetuneTask(
        settings=settings,
        model_uri=pretrained.uri,
        tokenizer_uri=meta.get("tokenizer_uri") or Layout(config.output).tokenizer(meta["tokenizer_version"]),
        s3=config.s3,
        tracking_uri=mlflow.get_tracking_uri(),  # the registry this driver resolved
        run_id=run_id,
        classes=classes,
        pairs=cls.class_pairs(clips, classes),
        train=train,
        test=test,
        test_words=[words[c.row] for c in test],
        zero_shot_prefix=prefix,
    )
    # One Ray task, not a Ray Train worker group: a classification table is small next to the
    # pretraining corpus (the demo's 60 clips, YouCook2's ~10k segments), so one device trains
    # it in seconds to minutes, and a linear probe's head in milliseconds. A TorchTrainer's
    # worker group costs more than that to start: 38-53 s with an empty train loop on the
    # shared 2-core demo machine (Ray 2.60, four measurements), against this stage's budget of
    # well under a minute. On a cluster the task lands on a GPU node when there is one.
    use_gpu = bool(ray.cluster_resources().get("GPU", 0))
    log.info("training on %d clips (%.1f s to prepare them)", len(train), time.perf_counter() - started)
    trained = ray.get(ray.remote(num_gpus=1 if use_gpu else 0)(train_task).remote(task))
    log.info("trained and scored (%.1f s so far)", time.perf_counter() - started)

    metrics, confusions = run_metrics(trained, test, classes)
    metrics |= {"train_clips": float(len(train)), "test_clips": float(len(test))}
    metrics["unreadable_clips"] = float(len(unreadable))
    notes = {"pretrained model": pretrained.uri, "labels": redact(settings.labels), "mode": settings.mode}
    notes["zero-shot template"] = zero_shot_template(prefix)
    blend = cls.blend_weight(settings, task.pairs)
    if settings.zero_shot_weight and not blend:
        log.warning("finetune.zero_shot_weight ignored: the table names no (verb, object) pair per class")
    notes["zero-shot weight"] = f"{blend:g}" + (
        "" if blend or not settings.zero_shot_weight else " (no verb/object pairs)"
    )
    record_run(run_id, metrics, classes, confusions, unreadable, notes)
    info = {
        "pretrained_model": pretrained.uri,
        "mode": settings.mode,
        "steps": settings.steps,
        "labels_uri": settings.labels,
        "labels_digest": trained_on["labels_digest"],
        "clips": {"train": len(train), "test": len(test)},
        "input": "; then ".join(
            part
            for part, used in (
                (
                    "[CLS] video [SEP] through the encoder, mean of the video tokens' last hidden states",
                    settings.pooled_features,
                ),
                ("the mean [MASK] output of [CLS] template [>] video [SEP]", settings.template_features),
            )
            if used
        ),
        "pooled": settings.pooled_features,
        "template": zero_shot_template(prefix) if settings.template_features else None,
        # what `predict` blends with the head's scores (finetune.zero_shot_weight)
        "zero_shot": {"weight": blend, "prefix": prefix, "pairs": task.pairs} if blend else None,
        "run_id": run_id,
    }
    version = register_classifier(
        run_id, config, pretrained, trained.head, trained.encoder, classes, info, trained_on
    )
    decision = evaluate_and_promote(
        name, version, run_id, metrics, cls.METRIC, classifier_card, classifier_model_card(name)
    )
    log.info("registered %s v%s (%.1f s in all)", name, version, time.perf_counter() - started)
    verdict = "promoted to champion" if decision.promoted else "kept the current champion"
    print(
        f"finetune-classify: {name} v{version} on {pretrained.uri}: test top-1 {metrics['test_top1']:.3f} "
        + (f"(head alone {metrics['head_top1']:.3f}, " if blend else "(")
        + f"zero-shot {metrics['zero_shot_top1']:.3f}, chance {metrics['chance']:.3f}) over {len(classes)} "
        f"classes, {len(test)} test clips; {verdict} ({decision.reason})"
    )
    return FinetuneResult(
        name, version, pretrained.uri, run_id, metrics, decision.promoted, unreadable=unreadable
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("finetune-classify", run, argv)


if __name__ == "__main__":
    sys.exit(main())
