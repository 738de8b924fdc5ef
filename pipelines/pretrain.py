"""`videobert pretrain`: Ray Train TorchTrainer + DeepSpeed ZeRO over the token shards.

The driver resolves the token shards (newest codebook with the configured k/depth, newest
tokenizer that has shards for it), opens or continues the MLflow run, and starts the
trainer with the shards as a streaming Ray Data dataset. Each worker builds the model and
the DeepSpeed engine (videobert.training), restores the newest reported checkpoint, and
trains; rank 0 logs metrics. Checkpoints go to the Ray Train storage (local or s3://) every
`train.checkpoint_every` steps; the step is stored inside the checkpoint. Rerunning with the
same run name (default: experiment, size and token versions) resumes. At the end the driver
consolidates the fp32 weights from the last checkpoint and registers the model.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.common import init_ray, stage_main
from videobert import storage
from videobert.config import ExperimentConfig
from videobert.tables import Layout

log = logging.getLogger("videobert.pretrain")

TOKEN_COLUMNS = ["video_id", "segment_index", "text_ids", "video_tokens"]


@dataclass
class TokenInputs:
    """The token shards pretraining reads, and the vocabulary they were made with."""

    tokens_uri: str
    files: list[storage.ObjectInfo]
    text_vocab: list[str]
    num_visual: int
    codebook_version: str
    tokenizer_version: str
    codebook_uri: str
    tokenizer_uri: str


@dataclass
class PretrainResult:
    run_id: str
    model_version: str
    metrics: dict[str, float] = field(default_factory=dict)
    run_name: str = ""
    start_step: int = 0
    """Step the last training attempt started from (0 = from scratch)."""
    checkpoint: str = ""


def resolve_inputs(config: ExperimentConfig) -> TokenInputs:
    """Newest codebook with the configured k/depth, and the newest tokenizer with shards for it."""
    from videobert.codebook import latest_codebook, list_codebooks
    from videobert.text_tokenizer import TextTokenizer, list_tokenizers

    output, s3 = config.output, config.s3
    layout = Layout(output)
    codebook_uri = latest_codebook(output, s3, k=config.codebook.k, depth=config.codebook.depth)
    if codebook_uri is None:
        raise storage.StorageError(
            f"no codebook with k={config.codebook.k} depth={config.codebook.depth} under "
            f"{layout.codebooks}: run `videobert fit-codebook` and `videobert tokenize` first"
        )
    codebook = next(meta for meta in list_codebooks(output, s3) if meta["uri"] == codebook_uri)
    tokenizers = sorted(list_tokenizers(output, s3), key=lambda m: (m.get("created_at", ""), m["version"]))
    for meta in reversed(tokenizers):
        tokens_uri = layout.tokens(codebook["version"], meta["version"])
        files = storage.list_objects(tokens_uri, s3, ["parquet"]) if storage.exists(tokens_uri, s3) else []
        if files:
            tokenizer = TextTokenizer.load(meta["uri"], s3)
            return TokenInputs(
                tokens_uri=tokens_uri,
                files=files,
                text_vocab=tokenizer.vocab,
                num_visual=int(codebook["vocab_size"]),
                codebook_version=codebook["version"],
                tokenizer_version=tokenizer.version,
                codebook_uri=codebook_uri,
                tokenizer_uri=meta["uri"],
            )
    raise storage.StorageError(
        f"no token shards for codebook {codebook['version']} under {layout.tokens_root}: "
        "run `videobert tokenize` first"
    )


def default_run_name(config: ExperimentConfig, inputs: TokenInputs, init_model_uri: str | None) -> str:
    """Same inputs and starting point -> same name -> a rerun resumes that Ray Train run."""
    if config.train.run_name:
        return config.train.run_name
    name = f"{config.name}-{config.model.size}-{inputs.codebook_version}-{inputs.tokenizer_version}"
    return name + starting_point_suffix(init_model_uri)


def starting_point_suffix(init_model_uri: str | None) -> str:
    """Run-name suffix for a run that continues from a registered version ("" from scratch)."""
    return f"-from-v{init_model_uri.rsplit('/', 1)[1]}" if init_model_uri else ""


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed engine, restore, stream examples, train, checkpoint."""
    import ray.train

    from videobert import training
    from videobert.model import JointVocab, build_model, init_from_bert
    from videobert.tracking import MetricsLogger
    from videobert.training_examples import ExampleBuilder

    config: ExperimentConfig = loop_config["config"]
    train = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    training.init_distributed(train.use_gpu)

    vocab = JointVocab.from_dict(loop_config["vocab"])
    model = build_model(config.model.size, vocab, config.model.max_seq_len, seed=train.seed)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("init_model_uri"):
        continue_from_registered(model, vocab, loop_config, rank)
    elif checkpoint is None and config.model.init_from:
        init_from_bert(model, config.model.init_from, vocab)
    engine = training.build_engine(model, train, world)
    step = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step = training.load_checkpoint(engine, directory)
    start_step = step
    if rank == 0:
        log.info("worker 0 of %d: starting at step %d of %d", world, step, train.steps)

    builder = ExampleBuilder(vocab, config.model.max_seq_len, config.examples)
    shard = ray.train.get_dataset_shard("train")
    micro = training.micro_batch_size(train, world)

    def micro_batches() -> Any:
        # A shard small enough to keep is streamed once, then replayed from memory in a new
        # order each epoch: restarting a Ray Data split per epoch costs seconds, which would
        # dominate a small corpus. A large shard streams every epoch.
        kept: list[dict[str, np.ndarray]] | None = []
        kept_rows, epoch = 0, 0
        while True:
            # Seeded by where this attempt starts, so a resumed run does not replay the same batches.
            rng = np.random.default_rng([train.seed, rank, start_step, epoch])
            seen = False
            if epoch > 0 and kept is not None:
                for index in rng.permutation(len(kept)):
                    yield builder.batch(kept[index], rng)
                epoch += 1
                continue
            for rows in shard.iter_batches(batch_size=micro, batch_format="numpy"):
                seen = True
                if kept is not None:
                    kept.append(rows)
                    kept_rows += len(rows["video_id"])
                    kept = kept if kept_rows <= train.cache_shard_rows else None
                yield builder.batch(rows, rng)
            if not seen:
                raise RuntimeError(f"worker {rank} received no token rows")
            epoch += 1

    batches = micro_batches()
    logger = MetricsLogger(loop_config["run_id"], loop_config["tracking_uri"]) if rank == 0 else None
    fault = loop_config.get("fault")
    metrics: dict[str, float] = {}

    def report(step: int, metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            training.save_checkpoint(engine, tmp, step)
            ray.train.report(
                {**metrics, "step": step, "start_step": start_step},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
            )

    if step >= train.steps:  # a finished run rerun: report its checkpoint again, train nothing
        report(step, metrics)
    while step < train.steps:
        result = training.train_step(engine, [next(batches) for _ in range(train.grad_accum)])
        step += 1
        metrics = result.metrics
        if fault and rank == fault["rank"] and step == fault["step"] and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).write_text(str(step))  # once: the replacement worker carries on
            os._exit(1)  # a real process death, as a lost node would cause
        if logger is not None and (step % train.log_every == 0 or step == train.steps):
            logger.log(step, metrics)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
            log.info("step %d/%d: %s", step, train.steps, shown)
        if step % train.checkpoint_every == 0 or step == train.steps:
            report(step, metrics)


def continue_from_registered(model: Any, vocab: Any, loop_config: dict[str, Any], rank: int) -> None:
    """Initialise a fresh run from a registered version (train.resume_from_champion)."""
    from videobert.model import init_from_videobert
    from videobert.registry import load_registered_model
    from videobert.tracking import use_tracking_uri

    use_tracking_uri(loop_config["tracking_uri"])
    source, source_vocab, meta = load_registered_model(loop_config["init_model_uri"])
    same_codebook = meta.get("codebook_version") == loop_config["codebook_version"]
    copied = init_from_videobert(model, vocab, source, source_vocab, same_codebook)
    if rank == 0:
        log.info("initialised from %s: %s", loop_config["init_model_uri"], copied)


def champion_to_continue_from(config: ExperimentConfig) -> str | None:
    """The pinned champion URI when `train.resume_from_champion` is set and a champion exists."""
    if not config.train.resume_from_champion:
        return None
    from mlflow import MlflowClient

    from videobert.registry import CHAMPION, alias_version

    name = config.mlflow.registered_model
    version = alias_version(MlflowClient(), name, CHAMPION)
    if version is None:
        log.info("train.resume_from_champion: no %s@%s yet, starting from scratch", name, CHAMPION)
        return None
    return f"models:/{name}/{version}"


def run(config: ExperimentConfig, fault: dict[str, Any] | None = None) -> PretrainResult:
    """Pretrain on the token shards and register the model. `fault` is for tests only:
    {"rank", "step", "marker"} makes that rank exit at that step once."""
    import mlflow
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from videobert import training
    from videobert.evaluation import in_holdout
    from videobert.model import JointVocab, VideoBert, VideoBertConfig, load_weights
    from videobert.registry import log_and_register_model
    from videobert.tracking import (
        log_lineage,
        log_loss_curve,
        setup_experiment,
        start_or_resume_run,
        tracking_uri,
        use_tracking_uri,
    )

    inputs = resolve_inputs(config)
    vocab = JointVocab(inputs.text_vocab, inputs.num_visual)
    uri = tracking_uri(config)
    setup_experiment(config)
    init_model_uri = champion_to_continue_from(config)
    run_name = default_run_name(config, inputs, init_model_uri)
    run_id, resumed = start_or_resume_run(config, run_name)
    log_lineage(run_id, inputs.tokens_uri, inputs.files, inputs.codebook_version, inputs.tokenizer_version)
    log.info("MLflow run %s (%s) at %s", run_id, "continued" if resumed else "new", uri)
    if init_model_uri:
        mlflow.MlflowClient().set_tag(run_id, "init_from", init_model_uri)

    init_ray()
    fs, root = storage.filesystem(inputs.tokens_uri, config.s3)
    paths = [storage.filesystem(f.uri, config.s3)[1] for f in inputs.files]
    dataset = ray.data.read_parquet(paths, filesystem=fs, columns=TOKEN_COLUMNS)
    fraction = config.evaluate.holdout_fraction
    if fraction > 0:  # the videos evaluate holds out never reach training
        dataset = dataset.filter(lambda row: not in_holdout(row["video_id"], fraction))

    storage_uri = config.train.storage_path or Layout(config.output).train
    storage_fs = None
    storage_path = storage_uri
    if storage.is_s3(storage_uri):
        storage_fs, storage_path = storage.filesystem(storage_uri, config.s3)
    else:
        storage_path = os.path.abspath(storage_uri)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config,
            "vocab": vocab.to_dict(),
            "run_id": run_id,
            "tracking_uri": uri,
            "fault": fault,
            "init_model_uri": init_model_uri,
            "codebook_version": inputs.codebook_version,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.train.workers, use_gpu=config.train.use_gpu
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
        state = training.consolidated_fp32_state(directory)
    model = VideoBert(VideoBertConfig.from_size(config.model.size, vocab.size, config.model.max_seq_len))
    load_weights(model, state)
    metadata = {
        "codebook_version": inputs.codebook_version,
        "tokenizer_version": inputs.tokenizer_version,
        "codebook_uri": inputs.codebook_uri,
        "tokenizer_uri": inputs.tokenizer_uri,
        "tokens_uri": inputs.tokens_uri,
        "model_size": config.model.size,
        "max_seq_len": config.model.max_seq_len,
        "steps": int(metrics.get("step", config.train.steps)),
        "run_name": run_name,
        "checkpoint": result.checkpoint.path,
        "init_from": init_model_uri or config.model.init_from or "",
    }
    use_tracking_uri(uri)
    log_loss_curve(run_id)
    version = log_and_register_model(run_id, model, vocab, metadata, config, config.mlflow.registered_model)
    mlflow.MlflowClient().set_terminated(run_id, "FINISHED")
    log.info("registered %s version %s as @candidate", config.mlflow.registered_model, version)
    return PretrainResult(
        run_id=run_id,
        model_version=version,
        metrics=metrics,
        run_name=run_name,
        start_step=int(metrics.get("start_step", 0)),
        checkpoint=result.checkpoint.path,
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("pretrain", run, argv)


if __name__ == "__main__":
    sys.exit(main())
