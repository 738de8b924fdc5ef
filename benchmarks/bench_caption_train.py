"""The captioner's training throughput: our Ray Train loop (a TorchTrainer worker, as
`videobert finetune-caption` runs it) against a bare PyTorch loop of the same model, same data,
same steps, side by side in one run.

Both train `captioning.CaptionModel` with the paper's settings (2 layers, hidden 128, dropout
0.4, Adam 1e-3, batch 128) on random "VideoBERT + S3D"-shaped features (2 x 64 + 1024) and
14-token captions. Reported: steps/s inside the loop (the loop's own cost) and the wall time
of the whole Ray Train run (with the worker group's start-up, paid once per stage run).

    python benchmarks/bench_caption_train.py [--steps 200] [--segments 256]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from videobert.captioning import CaptionModel, CaptionVocab, caption_loss, caption_tensor


def make_data(segments: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(segments, 64 + 64 + 1024, generator=generator)
    words = ["slide", "lift", "spin", "circle", "square", "star"]
    captions = [
        f"now let me show you how to {words[i % 3]} the {words[3 + (i // 3) % 3]}." for i in range(segments)
    ]
    vocab = CaptionVocab.build(captions)
    return features, caption_tensor(vocab, captions, 20), len(vocab)


def loop(steps: int, segments: int) -> float:
    """Steps per second of the training loop (the part both sides share)."""
    torch.manual_seed(0)
    features, captions, vocab_size = make_data(segments)
    model = CaptionModel([64, 64, 1024], vocab_size, 128, 2, 8, 0.4, 20)
    model.standardise_with(features)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    started = time.perf_counter()
    for _ in range(steps):
        batch = torch.randint(0, segments, (128,))
        loss = caption_loss(model, features[batch], captions[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps / (time.perf_counter() - started)


def ray_worker(config: dict) -> None:
    import json
    import tempfile

    import ray.train

    speed = loop(config["steps"], config["segments"])
    with tempfile.TemporaryDirectory() as tmp:  # Ray Train 2.60 keeps metrics only with a checkpoint
        with open(os.path.join(tmp, "speed.json"), "w") as file:
            json.dump({"steps_per_s": speed}, file)
        ray.train.report({"steps_per_s": speed}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--segments", type=int, default=256)
    args = parser.parse_args()
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    torch.set_num_threads(2)  # as the Ray Train worker
    bare = loop(args.steps, args.segments)
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), log_to_driver=False)
    started = time.perf_counter()
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={"steps": args.steps, "segments": args.segments},
        # as finetune-caption: one worker with 2 CPUs (two torch threads)
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2.0}),
        run_config=ray.train.RunConfig(storage_path="/tmp/bench-caption-train"),
    )
    result = trainer.fit()
    wall = time.perf_counter() - started
    with result.checkpoint.as_directory() as directory:
        import json

        ours = json.loads(open(os.path.join(directory, "speed.json")).read())["steps_per_s"]
    print(f"{args.steps} steps of batch 128, {args.segments} segments; load {os.getloadavg()[0]:.1f}")
    print(f"{'':<28} {'Ray Train':>10} {'bare torch':>11} {'ratio':>7}")
    print(f"{'loop steps/s':<28} {ours:>10.1f} {bare:>11.1f} {ours / bare:>7.2f}")
    bare_wall = args.steps / bare
    print(f"{'wall s (incl. start-up)':<28} {wall:>10.1f} {bare_wall:>11.1f} {wall / bare_wall:>7.2f}")


if __name__ == "__main__":
    main()
