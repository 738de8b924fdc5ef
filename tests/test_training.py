"""The DeepSpeed train step across two real gloo ranks, without Ray; checkpoints load weights-only."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port
from tests.token_corpus import NUM_VISUAL, TEXT_VOCAB, token_table

WORLD = 2


def rank_main(rank: int, port: int, results: dict, zero_stage: int = 2, video_input: str = "tokens") -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    import torch

    from tests.token_corpus import row_features
    from videobert import training
    from videobert.config import TrainConfig
    from videobert.model import JointVocab, build_model
    from videobert.training_examples import ExampleBuilder

    torch.set_num_threads(1)
    training.init_distributed(use_gpu=False)
    vocab = JointVocab(TEXT_VOCAB, NUM_VISUAL)
    train = TrainConfig(steps=2, workers=WORLD, zero_stage=zero_stage, batch_size=8 * WORLD, precision="fp32")
    model = build_model("debug", vocab, max_positions=64, video_input=video_input)
    engine = training.build_engine(model, train, WORLD)
    table = token_table(num_videos=2, segments=4, seed=rank)
    columns = table.to_pydict()
    if video_input != "tokens":  # each row's clip features, as FeatureJoiner reads them
        columns["video_features"] = row_features(table)
    if rank == 0:  # narration-less footage: only video-only examples, so no text+video pair
        columns["text_ids"] = [[] for _ in columns["text_ids"]]
    builder = ExampleBuilder(vocab, max_len=64, video_input=video_input)
    rng = np.random.default_rng(rank)
    losses = []
    for _ in range(2):
        batch = builder.batch(columns, rng)
        assert (len(batch["align_labels"]) == 0) == (rank == 0)
        metrics = training.train_step(engine, [batch]).metrics
        assert ("nce_loss" in metrics) == (video_input != "tokens")
        losses.append(metrics["loss"])
    results[rank] = losses
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize(("zero_stage", "video_input"), [(2, "tokens"), (3, "features")])
def test_ranks_with_and_without_alignment_pairs_step_together_under_zero(zero_stage, video_input) -> None:
    """A rank whose micro-batch has no text+video pair must still hand DeepSpeed a gradient for
    the alignment head: otherwise the two ranks' ZeRO gradient buckets differ and gloo aborts.
    The `features` case (CBT's continuous video input, InfoNCE on masked clips) under ZeRO-3:
    the feature projection and contrastive head are sharded and stepped like the rest."""
    results = mp.Manager().dict()
    mp.spawn(rank_main, args=(free_port(), results, zero_stage, video_input), nprocs=WORLD, join=True)
    assert sorted(results.keys()) == [0, 1]
    assert all(np.isfinite(results[rank]).all() for rank in range(WORLD))


class Planted:
    """What a hostile checkpoint could hold: unpickling it runs code (here, makes a directory)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    """Add a Planted object to a checkpoint file, as someone with write access to it could."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, just written
    state["planted"] = Planted(str(marker))
    torch.save(state, path)


def checkpoint_main(rank: int, port: int, root: str, results: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    from videobert import training
    from videobert.config import TrainConfig
    from videobert.model import JointVocab, build_model

    torch.set_num_threads(1)
    training.init_distributed(use_gpu=False)
    vocab = JointVocab(TEXT_VOCAB, NUM_VISUAL)
    train = TrainConfig(steps=2, workers=1, zero_stage=2, batch_size=2, precision="bf16")
    model = build_model("debug", vocab, max_positions=32)
    engine = training.build_engine(model, train, 1)
    directory = Path(root) / "checkpoint"
    training.save_checkpoint(engine, directory, step=7)
    # DeepSpeed's own classes (loss scaler, ZeRO stage, bf16 fragments) load under weights_only.
    results["step"] = training.load_checkpoint(engine, directory)
    results["weights"] = sorted(training.consolidated_fp32_state(directory)) == sorted(model.state_dict())
    (optim_states,) = (directory / training.CHECKPOINT_TAG).glob("*optim_states.pt")
    plant(optim_states, Path(root) / "ran-on-load")
    try:
        training.load_checkpoint(engine, directory)
        results["refused"] = False
    except pickle.UnpicklingError:
        results["refused"] = True
    torch.distributed.destroy_process_group()


def test_deepspeed_checkpoints_load_weights_only(tmp_path) -> None:
    """A real ZeRO-2 bf16 checkpoint loads through weights_only unpickling; one with a planted
    object is refused instead of running it (DeepSpeed itself passes weights_only=False)."""
    results = mp.Manager().dict()
    mp.spawn(checkpoint_main, args=(free_port(), str(tmp_path), results), nprocs=1, join=True)
    assert results["step"] == 7 and results["weights"]
    assert results["refused"] and not (tmp_path / "ran-on-load").exists()


def test_checkpoint_files_read_without_deepspeed_are_loaded_weights_only(tmp_path) -> None:
    """checkpoint_step and consolidated_fp32_state (ZeRO 0: whole weights) refuse a planted object."""
    from videobert import training

    states = tmp_path / training.CHECKPOINT_TAG / "mp_rank_00_model_states.pt"
    states.parent.mkdir()
    torch.save({"step": 3, "module": {"w": torch.ones(2)}}, states)
    assert training.checkpoint_step(tmp_path) == 3
    assert list(training.consolidated_fp32_state(tmp_path)) == ["w"]
    plant(states, tmp_path / "ran-on-load")
    for read in (training.checkpoint_step, training.consolidated_fp32_state):
        with pytest.raises(pickle.UnpicklingError):
            read(tmp_path)
    assert not (tmp_path / "ran-on-load").exists()
