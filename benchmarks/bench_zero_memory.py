"""Peak memory per worker under DeepSpeed ZeRO 1/2/3 at the same shape (2 workers, gloo or NCCL).

Each stage runs in fresh processes (torch.multiprocessing, no Ray): build VideoBert, wrap it
with videobert.training.build_engine, train a few packed batches, and report per rank the
peak RSS growth over the process's baseline (CPU) or the peak CUDA allocation (GPU).

    python benchmarks/bench_zero_memory.py                       # CPU, a small shape
    python benchmarks/bench_zero_memory.py --size base --device cuda
"""

from __future__ import annotations

import argparse
import os
import resource

import numpy as np
import torch
import torch.multiprocessing as mp

WORLD = 2
STAGES = (0, 1, 2, 3)  # stage 0 is the peer: data parallel with replicated optimizer state


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_state_mib(engine: object) -> float:
    """Bytes this rank holds in parameters, optimizer states and fp32 master partitions.

    What ZeRO partitions, counted from the tensors themselves: a CPU process's peak RSS also
    holds allocator caches and transient buffers that hide the difference.
    """
    seen: dict[int, int] = {}

    def add(tensor: object) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()

    for param in engine.module.parameters():
        add(getattr(param, "ds_tensor", param.data))  # ZeRO-3 keeps only its partition
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in optimizer.param_groups:
        for param in group["params"]:
            add(param.data)
            for value in optimizer.state.get(param, {}).values():
                add(value)
    return sum(seen.values()) / 2**20


def worker(rank: int, stage: int, args: argparse.Namespace, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    from videobert import training
    from videobert.config import TrainConfig
    from videobert.model import JointVocab, build_model
    from videobert.training_examples import ExampleBuilder

    training.init_distributed(use_gpu=cuda)
    baseline = rss_mib()
    vocab = JointVocab(30_522, 20_736)
    train = TrainConfig(
        steps=10, workers=WORLD, zero_stage=stage, batch_size=8 * WORLD, precision=args.precision
    )
    model = build_model(args.size, vocab, max_positions=128)
    engine = training.build_engine(model, train, WORLD)
    builder = ExampleBuilder(vocab, max_len=128)
    rng = np.random.default_rng(rank)
    columns = {
        "video_id": [f"v{i // 4}" for i in range(8)],
        "segment_index": [i % 4 for i in range(8)],
        "text_ids": [rng.integers(0, 30_522, 30) for _ in range(8)],
        "video_tokens": [rng.integers(0, 20_736, 40) for _ in range(8)],
    }
    for _ in range(args.steps):
        training.train_step(engine, [builder.batch(columns, rng)])
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mib() - baseline
    results[(stage, rank)] = peak
    results[(stage, rank, "state")] = model_state_mib(engine)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="debug", help="a MODEL_SIZES name (vocabulary is the paper's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    manager = mp.Manager()
    results = manager.dict()
    for offset, stage in enumerate(STAGES):
        mp.spawn(worker, args=(stage, args, 29600 + offset, results), nprocs=WORLD, join=True)
    print(f"size {args.size}, vocab 51,264, {WORLD} workers, {args.precision}, {args.device}")
    what = "peak CUDA MiB" if args.device == "cuda" else "peak RSS growth MiB"
    peer = max(results[(0, rank)] for rank in range(WORLD))
    peer_state = max(results[(0, rank, "state")] for rank in range(WORLD))
    for stage in STAGES:
        peaks = [results[(stage, rank)] for rank in range(WORLD)]
        states = [results[(stage, rank, "state")] for rank in range(WORLD)]
        name = "no ZeRO (peer: plain data parallel)" if stage == 0 else f"ZeRO-{stage}"
        print(
            f"{name}: {what} per worker "
            + ", ".join(f"{p:.0f}" for p in peaks)
            + f" (ratio to peer {max(peaks) / peer:.2f}); model-state MiB per worker "
            + ", ".join(f"{s:.0f}" for s in states)
            + f" (ratio to peer {max(states) / peer_state:.2f})"
        )


if __name__ == "__main__":
    main()
