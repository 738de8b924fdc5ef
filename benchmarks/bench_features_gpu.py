"""Feature actor throughput vs a bare S3D forward at the same batch, on one GPU, without Ray.

    python benchmarks/bench_features_gpu.py [--batch 32] [--frames 16] [--size 224] [--seconds 20]

Ours: `ClipEncoder.__call__` exactly as a feature actor runs it: uint8 clips (B, T, H, W, 3)
from host memory -> GPU, Kinetics normalisation, `model.features` in bf16 autocast, pooled,
L2-normalised, back to host as float32.
Peer: torchvision's S3D forward (`model(x)`) in bf16 autocast on a normalised float batch
that already sits on the GPU (the bare forward, no data movement).
Both use random weights (no download needed); weights do not change the speed.
Prints clips/s for each and the ratio ours/peer (goal >= 0.9).
Needs only torch, torchvision, numpy, pyarrow, pyyaml (no Ray, no PyAV).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from videobert.config import EncoderConfig  # noqa: E402
from videobert.features import ClipEncoder  # noqa: E402


def clips_per_second(step, batch: int, seconds: float, sync) -> float:
    for _ in range(3):  # warm-up: cuDNN algorithm choice, allocator
        step()
    sync()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        done += batch
    sync()
    return done / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (use --device cpu only to smoke-test it)")
        return 1
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.backends.cudnn.benchmark = True  # both sides get the same cuDNN autotuning

    encoder = ClipEncoder(
        EncoderConfig(weights="none", clips_per_batch=args.batch, dtype="auto"), device=args.device
    )
    rng = np.random.default_rng(0)
    host_clips = rng.integers(0, 256, size=(args.batch, args.frames, args.size, args.size, 3), dtype=np.uint8)

    peer_model = encoder.model  # the same S3D module and weights
    peer_input = torch.randn(args.batch, 3, args.frames, args.size, args.size, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    @torch.inference_mode()
    def peer_step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            peer_model(peer_input)

    def ours_step() -> None:
        encoder(host_clips)

    ours_step()  # compile/warm both once before any timing
    peer_step()
    peer = clips_per_second(peer_step, args.batch, args.seconds, sync)
    ours = clips_per_second(ours_step, args.batch, args.seconds, sync)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"device {name}; batch {args.batch}, {args.frames} frames, {args.size} px, {encoder.info()['dtype']}\n"
        f"  bare S3D forward (on-device input): {peer:8.1f} clips/s\n"
        f"  feature actor path (host uint8 in, features out): {ours:8.1f} clips/s\n"
        f"  ratio ours/peer: {ours / peer:.2f} (goal >= 0.9)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
