"""`videobert pretrain`: Ray Train TorchTrainer + DeepSpeed ZeRO over the token shards.

The driver takes the token shards that tokenize made for this config (`videobert.results`),
opens or continues the MLflow run named after what it trains on, and starts the trainer with
the shards as a streaming Ray Data dataset. Each worker builds the model and the DeepSpeed
engine, restores the newest reported checkpoint, and runs `videobert.training.train_loop`;
rank 0 logs metrics. Checkpoints (the step inside) go to the Ray Train storage, local or
s3://, every `train.checkpoint_every` steps, so a rerun with the same run name resumes. At the
end the driver consolidates the fp32 weights and registers the model as `candidate`, tagged
with what it was trained on; a rerun on the same tokens and settings trains nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from pipelines.common import init_ray, stage_main
from pipelines.ray_stages import read_parquet_files
from videobert import storage
from videobert.config import ExperimentConfig, TrainConfig
from videobert.results import PretrainResult, TokenizeResult, find_tokens, pretrain_run_name, train_digest
from videobert.tables import Layout

if TYPE_CHECKING:
    from videobert.training import StepCallback

log = logging.getLogger("videobert.pretrain")

TOKEN_COLUMNS = ["video_id", "segment_index", "text_ids", "video_tokens"]
# A model that takes clip features (model.video_input features / both) joins them by time.
FEATURE_JOIN_COLUMNS = ["start_s", "end_s"]


def token_columns(config: ExperimentConfig) -> list[str]:
    return TOKEN_COLUMNS + (FEATURE_JOIN_COLUMNS if config.model.video_input != "tokens" else [])


def example_builder(config: ExperimentConfig, vocab: Any, features_root: str | None = None) -> Any:
    """rows, rng -> a packed batch; with clip features joined first when the model takes them,
    from extract's tables under `features_root` (default: config.output; the driver passes it
    absolute, since a Ray Train worker runs in another directory)."""
    from videobert.training_examples import ExampleBuilder

    builder = ExampleBuilder(vocab, config.model.max_seq_len, config.examples, config.model.video_input)
    if config.model.video_input == "tokens":
        return builder.batch
    from videobert.token_shards import FeatureJoiner

    joiner = FeatureJoiner(features_root or config.output, config.s3)
    return lambda rows, rng: builder.batch(joiner(rows), rng)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed engine, restore, stream examples, train, checkpoint."""
    import ray.train

    from videobert import training
    from videobert.model import JointVocab
    from videobert.tracking import MetricsLogger, use_tracking_uri

    config: ExperimentConfig = loop_config["config"]
    train = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    training.init_distributed(train.use_gpu)
    use_tracking_uri(loop_config["tracking_uri"])  # a fresh worker: the registry of the driver
    vocab = JointVocab.from_dict(loop_config["vocab"])
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as directory:
        engine, start_step = training.prepare_rank(
            config, vocab, world, directory, loop_config["init_model_uri"], loop_config["codebook_version"]
        )
    if rank == 0:
        log.info("worker 0 of %d: starting at step %d of %d", world, start_step, train.steps)

    shard = ray.train.get_dataset_shard("train")
    micro = training.micro_batch_size(train, world)
    batches = training.replayed_batches(
        lambda: shard.iter_batches(batch_size=micro, batch_format="numpy"),
        example_builder(config, vocab, loop_config.get("features_root")),
        # Seeded by where this attempt starts, so a resumed run does not replay the same batches.
        seed=(train.seed, rank, start_step),
        keep_rows=train.cache_shard_rows,
    )
    logger = MetricsLogger(loop_config["run_id"], loop_config["tracking_uri"]) if rank == 0 else None

    def log_metrics(step: int, metrics: dict[str, float]) -> None:
        logger.log(step, metrics)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
        log.info("step %d/%d: %s", step, train.steps, shown)

    def report(step: int, metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            training.save_checkpoint(engine, tmp, step)
            ray.train.report(
                {**metrics, "step": step, "start_step": start_step},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
            )

    training.train_loop(
        engine,
        batches,
        train,
        start_step,
        on_log=log_metrics if logger is not None else None,
        on_checkpoint=report,
        on_step=loop_config["on_step"],
    )


def worker_resources(train: TrainConfig) -> dict[str, float] | None:
    """What each worker holds: Ray's default (1 CPU, or 1 GPU with use_gpu), plus one unit of
    `train.worker_resource` when set, so nodes that have one unit each take one worker each."""
    if not train.worker_resource:
        return None
    return {"GPU" if train.use_gpu else "CPU": 1.0, train.worker_resource: 1.0}


def run(
    config: ExperimentConfig,
    tokens: TokenizeResult | None = None,
    on_step: StepCallback | None = None,
) -> PretrainResult:
    """Pretrain on `tokens` (default: what tokenize made for this config) and register the
    model. `on_step(step, metrics)` runs in every worker after every step (tests use it)."""
    import mlflow
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from videobert import training
    from videobert.evaluation import held_out_video_ids
    from videobert.model import JointVocab
    from videobert.registry import CANDIDATE, already_trained, champion_to_continue_from, register_pretrained
    from videobert.text_tokenizer import TextTokenizer
    from videobert.tracking import (
        log_loss_curve,
        open_pretrain_run,
        setup_experiment,
        tracking_uri,
        use_tracking_uri,
    )

    tokens = tokens or find_tokens(config)
    name = config.mlflow.registered_model
    setup_experiment(config)
    trained_on = {"tokens_digest": tokens.digest, "train_digest": train_digest(config)}
    version = already_trained(config, trained_on)
    if version is not None:
        log.info("pretrain: candidate v%s already trained on these tokens and settings", version)
        return PretrainResult(name, version, skipped=True)

    vocab = JointVocab(TextTokenizer.load(tokens.tokenizer.uri, config.s3).vocab, tokens.codebook.vocab_size)
    uri = tracking_uri(config)
    init_model_uri = champion_to_continue_from(config)
    run_name = pretrain_run_name(config, tokens, init_model_uri)
    run_id = open_pretrain_run(config, tokens, run_name, init_model_uri)

    init_ray()
    fs, _ = storage.filesystem(tokens.tokens_uri, config.s3)
    paths = [storage.filesystem(f.uri, config.s3)[1] for f in tokens.files]
    dataset = read_parquet_files(paths, fs, token_columns(config))
    held_out = held_out_video_ids(config)
    if held_out:  # the videos evaluate holds out never reach training
        dataset = dataset.filter(lambda row: row["video_id"] not in held_out)

    storage_fs, storage_path = storage.arrow_location(
        config.train.storage_path or Layout(config.output).train, config.s3
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config,
            "vocab": vocab.to_dict(),
            "run_id": run_id,
            "tracking_uri": uri,
            "init_model_uri": init_model_uri,
            "codebook_version": tokens.codebook.version,
            "on_step": on_step,
            # Absolute: a Ray Train worker runs in another directory than the driver.
            "features_root": config.output if "://" in config.output else os.path.abspath(config.output),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.train.workers,
            use_gpu=config.train.use_gpu,
            resources_per_worker=worker_resources(config.train),
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"pretrain run {run_name} ended without a checkpoint")
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}

    with result.checkpoint.as_directory() as directory:
        model = training.model_from_checkpoint(directory, config, vocab)
    use_tracking_uri(uri)  # Ray Train may have started workers that re-pointed MLflow here
    log_loss_curve(run_id)
    trained = {
        **trained_on,
        "steps": int(metrics.get("step", config.train.steps)),
        "run_name": run_name,
        "checkpoint": result.checkpoint.path,
        "init_from": init_model_uri or config.model.init_from or "",
    }
    version = register_pretrained(run_id, model, vocab, config, tokens, trained)
    mlflow.MlflowClient().set_terminated(run_id, "FINISHED")
    log.info("registered %s version %s as @%s", name, version, CANDIDATE)
    return PretrainResult(
        name,
        version,
        run_id=run_id,
        run_name=run_name,
        metrics=metrics,
        start_step=int(metrics.get("start_step", 0)),
        checkpoint=result.checkpoint.path,
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("pretrain", run, argv)


if __name__ == "__main__":
    sys.exit(main())
