"""The DeepSpeed train step across two real gloo ranks, without Ray."""

from __future__ import annotations

import socket

import numpy as np
import torch.multiprocessing as mp

from tests.token_corpus import NUM_VISUAL, TEXT_VOCAB, token_table

WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_main(rank: int, port: int, results: dict) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    import torch

    from videobert import training
    from videobert.config import TrainConfig
    from videobert.model import JointVocab, build_model
    from videobert.training_examples import ExampleBuilder

    torch.set_num_threads(1)
    training.init_distributed(use_gpu=False)
    vocab = JointVocab(TEXT_VOCAB, NUM_VISUAL)
    train = TrainConfig(steps=2, workers=WORLD, zero_stage=2, batch_size=8 * WORLD, precision="fp32")
    engine = training.build_engine(build_model("debug", vocab, max_positions=64), train, WORLD)
    columns = token_table(num_videos=2, segments=4, seed=rank).to_pydict()
    if rank == 0:  # narration-less footage: only video-only examples, so no text+video pair
        columns["text_ids"] = [[] for _ in columns["text_ids"]]
    builder = ExampleBuilder(vocab, max_len=64)
    rng = np.random.default_rng(rank)
    losses = []
    for _ in range(2):
        batch = builder.batch(columns, rng)
        assert (len(batch["align_labels"]) == 0) == (rank == 0)
        losses.append(training.train_step(engine, [batch]).metrics["loss"])
    results[rank] = losses
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_ranks_with_and_without_alignment_pairs_step_together_under_zero2() -> None:
    """A rank whose micro-batch has no text+video pair must still hand DeepSpeed a gradient for
    the alignment head: otherwise the two ranks' ZeRO gradient buckets differ and gloo aborts."""
    results = mp.Manager().dict()
    mp.spawn(rank_main, args=(free_port(), results), nprocs=WORLD, join=True)
    assert sorted(results.keys()) == [0, 1]
    assert all(np.isfinite(results[rank]).all() for rank in range(WORLD))
