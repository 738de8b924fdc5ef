"""Training-step tokens/s: our VideoBert vs Hugging Face BertForMaskedLM, same run, same shape.

Same vocabulary (6 specials + 30,522 text + 20,736 visual words), sequence length, batch,
precision (autocast), optimizer (torch AdamW) and 15% masked positions. Ours computes the MLM
head only at the masked positions and fuses Q/K/V; Hugging Face computes logits everywhere.
Rounds alternate between the two so machine noise hits both; the best round counts.

    python benchmarks/bench_train_step.py                         # small CPU shape
    python benchmarks/bench_train_step.py --large --device cuda   # BERT-large, seq 512, bf16, batch 32

No Ray, no DeepSpeed: this measures the model's step. MFU uses counted FLOPs
(VideoBert.flops_per_token: 3x the forward matmul FLOPs; the dense head for Hugging Face).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F
import transformers

from videobert.model import VideoBert, VideoBertConfig

VOCAB = 6 + 30_522 + 20_736
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def build_pair(args: argparse.Namespace, device: str) -> tuple[VideoBert, transformers.BertForMaskedLM]:
    if args.large:
        shape = dict(hidden=1024, layers=24, heads=16, intermediate=4096)
    else:
        shape = dict(hidden=128, layers=2, heads=2, intermediate=512)
    ours = VideoBert(VideoBertConfig(vocab_size=VOCAB, max_positions=512, **shape)).to(device)
    hf_config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        intermediate_size=shape["intermediate"],
        max_position_embeddings=512,
    )
    hf_config._attn_implementation = "sdpa"
    theirs = transformers.BertForMaskedLM(hf_config).to(device)
    return ours, theirs


def make_batch(args: argparse.Namespace, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(6, VOCAB, (args.batch, args.seq), generator=generator)
    types = torch.randint(0, 2, (args.batch, args.seq), generator=generator)
    masked = torch.rand(args.batch, args.seq, generator=generator) < 0.15
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    positions = torch.nonzero(masked.reshape(-1)).squeeze(-1)
    batch = {
        "ids": ids,
        "types": types,
        "labels": labels,
        "positions": positions,
        "targets": ids.reshape(-1)[positions],
    }
    return {k: v.to(device) for k, v in batch.items()}


def step_fns(args: argparse.Namespace, device: str) -> dict[str, tuple[object, object, float]]:
    ours, theirs = build_pair(args, device)
    batch = make_batch(args, device)
    autocast = (
        torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )
    fused = {"fused": True} if device.startswith("cuda") else {}
    ours_forward = torch.compile(ours) if args.compile else ours

    def ours_step(optimizer: torch.optim.Optimizer) -> None:
        with autocast:
            out = ours_forward(batch["ids"], batch["types"], mlm_positions=batch["positions"])
            loss = F.cross_entropy(out["mlm_logits"].float(), batch["targets"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def theirs_step(optimizer: torch.optim.Optimizer) -> None:
        with autocast:
            loss = theirs(input_ids=batch["ids"], token_type_ids=batch["types"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ours_flops = ours.flops_per_token(args.seq, masked_fraction=0.15)
    theirs_flops = ours.flops_per_token(args.seq, masked_fraction=1.0)  # dense head, same encoder
    return {
        "ours": (ours_step, torch.optim.AdamW(ours.parameters(), lr=1e-4, **fused), ours_flops),
        "hf": (theirs_step, torch.optim.AdamW(theirs.parameters(), lr=1e-4, **fused), theirs_flops),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="BERT-large at seq 512, bf16, batch 32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--precision", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile our model (not the peer)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    args.batch = args.batch or (32 if args.large else 8)
    args.seq = args.seq or (512 if args.large else 128)
    args.precision = args.precision or ("bf16" if args.large else "fp32")
    args.steps = args.steps or (10 if args.device.startswith("cuda") else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fns = step_fns(args, device)
    tokens = args.batch * args.seq
    for step, optimizer, _ in fns.values():  # warm-up (and compilation)
        for _ in range(3):
            step(optimizer)
        sync()
    best = {name: 0.0 for name in fns}
    for _ in range(args.rounds):
        for name, (step, optimizer, _) in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(optimizer)
            sync()
            best[name] = max(best[name], tokens * args.steps / (time.perf_counter() - start))
    peak = 0.0
    if cuda:
        gpu = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), 0.0)
        print(f"device: {gpu}; peak bf16 {peak / 1e12:.0f} TFLOP/s (spec)")
    print(
        f"shape: {'large' if args.large else 'small'} vocab {VOCAB} seq {args.seq} batch {args.batch} "
        f"{args.precision} compile={args.compile} torch {torch.__version__} transformers {transformers.__version__}"
    )
    for name, (_, _, flops) in fns.items():
        mfu = f", MFU {best[name] * flops / peak:.1%}" if peak else ""
        print(f"{name:>4}: {best[name]:,.0f} tokens/s{mfu}")
    print(f"ratio ours/hf: {best['ours'] / best['hf']:.2f}x")


if __name__ == "__main__":
    main()
