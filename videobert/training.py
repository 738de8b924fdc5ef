"""DeepSpeed wrapping and the train-step body, kept out of the model (torchtitan style).

Everything here runs in one process per rank, with or without Ray: Ray Train (pipelines/
pretrain.py) sets up torch.distributed and calls these functions; a benchmark on a GPU box
calls them directly.

Optimizer choice: a plain `torch.optim.AdamW` passed to DeepSpeed as a client optimizer (with
`zero_allow_untested_optimizer`), plus a torch `LambdaLR`. DeepSpeed's own Adam variants
JIT-compile C++/CUDA ops at first use, which costs 30-70 s per fresh worker on CPU. For the
same reason DeepSpeed's shared-memory CPU all-reduce is switched off (`skip_cpu_shm_comm`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from videobert.config import ExperimentConfig, TrainConfig
from videobert.model import JointVocab, VideoBert
from videobert.training_examples import IGNORE, REGIMES

CHECKPOINT_TAG = "ds"  # one DeepSpeed tag per checkpoint directory; the step lives in client_state


def init_distributed(use_gpu: bool = False) -> None:
    """Join torch.distributed through DeepSpeed unless Ray Train (or someone) already did."""
    import deepspeed

    if not use_gpu:
        skip_cpu_shm_comm()
    if torch.distributed.is_initialized():
        return
    # A single process without a launcher: a world of one on this machine.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False)


def micro_batch_size(train: TrainConfig, world_size: int) -> int:
    """Examples per rank per micro-step."""
    return train.batch_size // (world_size * train.grad_accum)


def deepspeed_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed config from TrainConfig: ZeRO stage, precision, accumulation, clipping."""
    config: dict[str, Any] = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(train, world_size),
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves, from rank 0
        "wall_clock_breakdown": False,
    }
    if train.zero_stage > 0:
        config["zero_optimization"] = {"stage": train.zero_stage}
    if train.precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def warmup_linear_decay(warmup_steps: int, total_steps: int) -> Any:
    """LR multiplier: linear warmup to 1, then linear decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW without weight decay on biases and LayerNorms, and its warmup + decay schedule."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.lr,
        betas=(0.9, 0.999),
        eps=1e-6,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear_decay(train.warmup_steps, train.steps)
    )
    return optimizer, schedule


def skip_cpu_shm_comm() -> None:
    """Keep DeepSpeed's comm backend from JIT-compiling its shared-memory CPU all-reduce.

    Without a GPU, DeepSpeed builds that C++/OpenMP op with g++ the first time its comm backend
    starts on a machine: 1-3 min on a 2-core box (every fresh CI machine, every first demo), and
    a compiler on every CPU worker. Marked incompatible, DeepSpeed keeps to torch.distributed's
    gloo group that Ray Train set up, which is what CPU runs (tests, the demo) need; GPU runs
    use NCCL and never build it.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def build_engine(model: VideoBert, train: TrainConfig, world_size: int) -> Any:
    """Wrap the model in a DeepSpeed engine (ZeRO stage, bf16, client AdamW + LambdaLR)."""
    import deepspeed

    if not torch.cuda.is_available():
        skip_cpu_shm_comm()
    optimizer, schedule = build_optimizer(model, train)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=deepspeed_config(train, world_size),
    )
    return engine


def to_device(batch: dict[str, np.ndarray], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in batch.items()}


def pretraining_loss(
    outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss (masked-token CE over every regime + alignment BCE) and detached parts.

    Parts are (sum, count) pairs so they can be averaged over micro-batches exactly.
    """
    logits = outputs["mlm_logits"].float()
    labels = batch["mlm_labels"]
    token_loss = F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE)
    loss = token_loss.sum() / max(1, labels.numel())  # a batch of only misaligned pairs has none
    parts: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        correct = (logits.argmax(-1) == labels).float()
        for regime, name in enumerate(REGIMES):
            selected = batch["mlm_regime"] == regime
            parts[f"mlm_loss_{name}"] = torch.stack([token_loss[selected].sum(), selected.sum().float()])
        for is_video, name in ((False, "text"), (True, "video")):
            selected = batch["mlm_is_video"] == is_video
            parts[f"mlm_acc_{name}"] = torch.stack([correct[selected].sum(), selected.sum().float()])
    if "nce_predicted" in outputs:
        loss = loss + contrastive_loss(outputs, batch, parts)
    if "alignment_logits" in outputs and not batch["align_labels"].numel():
        # No text+video pair in this micro-batch: keep the alignment head in the graph with a
        # zero loss, so every rank hands DeepSpeed a gradient for every parameter. Otherwise the
        # ranks' ZeRO gradient buckets differ in size and the collective fails (gloo aborts).
        loss = loss + 0.0 * outputs["alignment_logits"].float().sum()
    elif "alignment_logits" in outputs:
        align_logits = outputs["alignment_logits"].float()
        align_loss = F.binary_cross_entropy_with_logits(align_logits, batch["align_labels"])
        loss = loss + align_loss
        with torch.no_grad():
            count = torch.tensor(float(len(align_logits)), device=align_logits.device)
            parts["align_loss"] = torch.stack([align_loss.detach() * count, count])
            hits = ((align_logits > 0).float() == batch["align_labels"]).float().sum()
            parts["align_acc"] = torch.stack([hits, count])
    parts["loss"] = torch.stack([loss.detach(), torch.ones((), device=loss.device)])
    return loss, parts


def contrastive_loss(
    outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], parts: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Mean InfoNCE over the masked video positions (CBT); 0, still in the graph, without any.

    Adds `nce_loss` and `nce_acc` (the own clip scored highest) to `parts`."""
    from videobert.model import info_nce

    predicted, targets = outputs["nce_predicted"], outputs["nce_targets"]
    per_row = info_nce(predicted, targets, float(outputs["nce_temperature"]), batch.get("nce_clip_ids"))
    if not len(per_row):
        return 0.0 * (predicted.float().sum() + targets.float().sum())
    with torch.no_grad():
        count = torch.tensor(float(len(per_row)), device=per_row.device)
        parts["nce_loss"] = torch.stack([per_row.detach().sum(), count])
        scores = F.normalize(predicted.float(), dim=-1) @ F.normalize(targets.float(), dim=-1).T
        ids = batch.get("nce_clip_ids")
        own = torch.arange(len(scores), device=scores.device)
        best = scores.argmax(-1)
        hits = (best == own) if ids is None else (ids[best] == ids)
        parts["nce_acc"] = torch.stack([hits.float().sum(), count])
    return per_row.mean()


def forward(engine_or_model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model on a packed batch; clip features and InfoNCE targets go in when the batch has them."""
    extra = {}
    if "features" in batch:
        extra = {
            "feature_positions": batch["feature_positions"],
            "features": batch["features"],
            "nce_positions": batch["nce_positions"],
            "nce_features": batch["nce_features"],
        }
    return engine_or_model(
        input_ids=batch["input_ids"],
        token_type_ids=batch["token_type_ids"],
        position_ids=batch["position_ids"],
        seq_ids=batch["seq_ids"],
        mlm_positions=batch["mlm_positions"],
        cls_positions=batch["cls_positions"] if batch["cls_positions"].numel() else None,
        **extra,
    )


@dataclass
class StepResult:
    metrics: dict[str, float]
    tokens: int


def train_step(engine: Any, micro_batches: list[dict[str, np.ndarray]]) -> StepResult:
    """One optimizer step over `grad_accum` micro-batches; returns this rank's metrics."""
    start = time.perf_counter()
    totals: dict[str, torch.Tensor] = {}
    tokens = 0
    for micro in micro_batches:
        batch = to_device(micro, engine.device)
        if not batch["cls_positions"].numel():  # see pretraining_loss: a stand-in [CLS] at 0
            batch["cls_positions"] = torch.zeros(1, dtype=torch.long, device=engine.device)
        outputs = forward(engine, batch)
        loss, parts = pretraining_loss(outputs, batch)
        engine.backward(loss)
        engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
        for name, value in parts.items():
            totals[name] = totals.get(name, 0) + value.detach().float().cpu()
        tokens += int(micro["num_tokens"])
    seconds = time.perf_counter() - start
    metrics = {name: float(s / c) for name, (s, c) in totals.items() if c > 0}
    metrics["tokens_per_s"] = tokens / seconds
    metrics["lr"] = float(engine.get_lr()[0])
    return StepResult(metrics, tokens)


def save_checkpoint(engine: Any, directory: str | os.PathLike[str], step: int) -> None:
    """Every rank writes its shard; the global step goes inside (client_state)."""
    engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state={"step": step})


def load_checkpoint(engine: Any, directory: str | os.PathLike[str]) -> int:
    """Restore model, optimizer and schedule; returns the step stored in the checkpoint."""
    with weights_only_loads():
        path, client_state = engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
    if path is None:
        raise RuntimeError(f"no DeepSpeed checkpoint under {directory}")
    return int(client_state["step"])


def deepspeed_safe_globals() -> list[Any]:
    """The classes, besides tensors and containers, that our DeepSpeed checkpoints hold (found
    by loading the checkpoints of ZeRO 0-3, fp32 and bf16): the optimizer states' loss scaler,
    ZeRO stage and bf16 fragment addresses."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside unpickles only tensors, containers and deepspeed_safe_globals.

    DeepSpeed's own loaders (its checkpoint engine, zero_to_fp32) pass weights_only=False;
    TORCH_FORCE_WEIGHTS_ONLY_LOAD is torch's switch that overrides them, so a checkpoint
    directory (on shared storage, writable by others) cannot run code in a training worker.
    """
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def checkpoint_step(directory: str | os.PathLike[str]) -> int:
    """The step stored in a checkpoint directory, read without DeepSpeed."""
    files = sorted((Path(directory) / CHECKPOINT_TAG).glob("*model_states.pt"))
    if not files:
        raise RuntimeError(f"no DeepSpeed model states under {directory}")
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        state = torch.load(files[0], map_location="cpu", weights_only=True)
    return int(state["step"])


def consolidated_fp32_state(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a (sharded) DeepSpeed checkpoint, on CPU, for any ZeRO stage."""
    root = Path(directory)
    with weights_only_loads():
        if list((root / CHECKPOINT_TAG).glob("*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=CHECKPOINT_TAG)
        else:  # no ZeRO partitions: the module weights are whole in the model states
            model_states = root / CHECKPOINT_TAG / "mp_rank_00_model_states.pt"
            state = torch.load(model_states, map_location="cpu", weights_only=True)["module"]
    return {k: v.float().contiguous() for k, v in state.items()}


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation from counted FLOPs."""
    return tokens_per_s * flops_per_token / peak_flops if peak_flops > 0 else math.nan


# ---- the training loop ---------------------------------------------------------------------------


def replayed_batches(
    read_epoch: Callable[[], Iterable[dict[str, np.ndarray]]],
    build: Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]],
    seed: Sequence[int],
    keep_rows: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Training micro-batches forever, epoch after epoch, from batches of token rows.

    `read_epoch()` streams one epoch of row batches (a Ray Data shard, a list, ...) and
    `build(rows, rng)` turns rows into a training micro-batch. A corpus of at most `keep_rows`
    rows is read once and then replayed from memory in a new order each epoch: restarting a
    stream per epoch costs seconds, which would dominate a small corpus. A larger one streams
    every epoch. Epoch e draws from `default_rng([*seed, e])`.
    """
    kept: list[dict[str, np.ndarray]] | None = []
    kept_rows, epoch = 0, 0
    while True:
        rng = np.random.default_rng([*seed, epoch])
        if epoch > 0 and kept is not None:
            for index in rng.permutation(len(kept)):
                yield build(kept[index], rng)
            epoch += 1
            continue
        seen = False
        for rows in read_epoch():
            seen = True
            if kept is not None:
                kept.append(rows)
                kept_rows += len(next(iter(rows.values())))
                kept = kept if kept_rows <= keep_rows else None
            yield build(rows, rng)
        if not seen:
            raise RuntimeError("the training data holds no token rows")
        epoch += 1


StepCallback = Callable[[int, dict[str, float]], None]


def train_loop(
    engine: Any,
    batches: Iterator[dict[str, np.ndarray]],
    train: TrainConfig,
    start_step: int = 0,
    on_log: StepCallback | None = None,
    on_checkpoint: StepCallback | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, float]:
    """Optimizer steps from `start_step` to `train.steps`; returns the last step's metrics.

    Callbacks take (step, metrics): `on_step` after every step, `on_log` every `log_every`
    steps and at the end, `on_checkpoint` every `checkpoint_every` steps and at the end. A run
    that is already finished checkpoints once more and trains nothing, so a rerun reports it.
    """
    metrics: dict[str, float] = {}
    if start_step >= train.steps:
        if on_checkpoint is not None:
            on_checkpoint(start_step, metrics)
        return metrics
    step = start_step
    while step < train.steps:
        metrics = train_step(engine, [next(batches) for _ in range(train.grad_accum)]).metrics
        step += 1
        last = step == train.steps
        if on_step is not None:
            on_step(step, metrics)
        if on_log is not None and (step % train.log_every == 0 or last):
            on_log(step, metrics)
        if on_checkpoint is not None and (step % train.checkpoint_every == 0 or last):
            on_checkpoint(step, metrics)
    return metrics


def prepare_rank(
    config: ExperimentConfig,
    vocab: JointVocab,
    world_size: int,
    checkpoint_dir: str | None = None,
    init_model_uri: str | None = None,
    codebook_version: str = "",
) -> tuple[Any, int]:
    """One rank's model in its DeepSpeed engine, and the step to start from.

    Restored from `checkpoint_dir` when there is one; else a fresh model, initialised from a
    registered version (`init_model_uri`, train.resume_from_champion) or a BERT checkpoint
    (model.init_from) when configured.
    """
    from videobert.model import build_model, init_from_bert

    model = build_model(
        config.model.size,
        vocab,
        config.model.max_seq_len,
        seed=config.train.seed,
        video_input=config.model.video_input,
    )
    if checkpoint_dir is None and init_model_uri:
        from videobert.registry import init_from_registered

        init_from_registered(model, vocab, init_model_uri, codebook_version)
    elif checkpoint_dir is None and config.model.init_from:
        init_from_bert(model, config.model.init_from, vocab)
    engine = build_engine(model, config.train, world_size)
    start_step = load_checkpoint(engine, checkpoint_dir) if checkpoint_dir is not None else 0
    return engine, start_step


def model_from_checkpoint(
    directory: str | os.PathLike[str], config: ExperimentConfig, vocab: JointVocab
) -> VideoBert:
    """The full fp32 model from a (sharded) DeepSpeed checkpoint, on CPU."""
    from videobert.model import VideoBertConfig, load_weights

    model = VideoBert(
        VideoBertConfig.from_size(
            config.model.size, vocab.size, config.model.max_seq_len, video_input=config.model.video_input
        )
    )
    load_weights(model, consolidated_fp32_state(directory))
    return model
