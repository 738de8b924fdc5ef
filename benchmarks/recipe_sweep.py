"""Pretraining recipes across seeds, without Ray: which settings fit verbs reliably (issue 13).

Whether the debug model learns to name the verb depends on the seed (README, "Results"), so a
recipe is only evidence over several seeds, and on 2 CPU cores each `videobert run` takes about 5 minutes. This
script runs many recipe x seed pairs at once, on a GPU box where there is one:

    # here, after `videobert run` of the corpus (any number of steps: it makes the tables)
    python benchmarks/recipe_sweep.py export --config configs/demo.yaml --bundle .sweep/demo
    # anywhere torch is (Ray, DeepSpeed, MLflow and boto3 are not needed)
    python benchmarks/recipe_sweep.py sweep --bundle .sweep/demo --seeds 0 1 2 3 \\
        --recipe demo: --recipe "paper-mask:examples.mask_prob=0.15;train.steps=2500"

`export` writes what pretrain trains on and what evaluate scores into plain files: the training
token rows (the hash hold-out removed, as pretrain does), the held-out and labelled rows, the
zero-shot items, the tokenizer and the config. `sweep` trains each recipe x seed with the
library's own code (ExampleBuilder batches, VideoBert, `build_optimizer`'s AdamW and schedule,
`train_step`) in parallel processes, and scores it with evaluate's own functions (`mlm_metrics`,
`cross_modal_eval`, `zero_shot`). Plain AdamW with gradient clipping stands in for DeepSpeed:
on one worker ZeRO applies the same update. Results are one JSON line per run, and a table.
`model.video_input: tokens` only (features would need extract's tables in the bundle).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN_COLUMNS = ["video_id", "segment_index", "text_ids", "video_tokens"]
SHOWN = [
    "zero_shot_verb_top1",
    "zero_shot_object_top1",
    "alignment_auc_named",
    "retrieval_recall_at_1_named",
    "retrieval_median_rank_named",
    "train_zero_shot_verb_top1",
    "seconds",
]


def export(config_path: str, overrides: list[str], bundle: Path) -> None:
    """Write the bundle of a config whose pipeline has run (tokens and evalset exist)."""
    from videobert.config import load_config
    from videobert.evaluation import (
        evalset_root,
        held_out_video_ids,
        label_classes,
        names_a_label,
        read_labels,
        rows_to_columns,
        zero_shot_items,
        zero_shot_prefix,
    )
    from videobert.results import find_tokens
    from videobert.token_shards import read_tokens

    config = load_config(config_path, overrides)
    tokens = find_tokens(config)
    table = read_tokens(config.output, tokens.codebook.version, tokens.tokenizer.version, config.s3)
    held_out = held_out_video_ids(config)
    is_held = pa.array([v in held_out for v in table["video_id"].to_pylist()], pa.bool_())
    train = table.filter(pc.invert(is_held))
    holdout = table.filter(is_held)
    labels = read_labels(config.evaluate.labels, config)
    labelled = read_tokens(evalset_root(config), tokens.codebook.version, tokens.tokenizer.version, config.s3)
    items, _ = zero_shot_items(labels, labelled)
    scored = {item.video_id for item in items}
    labelled = labelled.filter(pa.array([v in scored for v in labelled["video_id"].to_pylist()]))
    holdout = pa.concat_tables([holdout.select(labelled.schema.names), labelled])
    label_words = {w.lower() for item in items for w in (item.verb, item.object)}
    rows = rows_to_columns(holdout).columns
    rows["named"] = [names_a_label(str(t or ""), label_words) for t in holdout["text"].to_pylist()]
    # Training videos' own labels (the demo's classes table has verb and object), to score
    # verbs on what was trained on ("fits" vs "generalises").
    train_items = []
    if config.finetune.labels:
        train_items, _ = zero_shot_items(read_labels(config.finetune.labels, config), train)
    verbs, objects = label_classes(config)
    # evaluate's own choice of the template's words (evaluation.zero_shot_prefix)
    prefix = zero_shot_prefix(config, train["text"].to_pylist(), verbs, objects)

    bundle.mkdir(parents=True, exist_ok=True)
    pq.write_table(train.select(TRAIN_COLUMNS), bundle / "train.parquet")
    pq.write_table(pa.table(rows), bundle / "heldout.parquet")
    _write_items(items, bundle / "zero_shot.parquet")
    _write_items(train_items, bundle / "train_videos.parquet")
    shutil.copytree(tokens.tokenizer.uri, bundle / "tokenizer", dirs_exist_ok=True)
    shutil.copy(config_path, bundle / "config.yaml")
    meta = {
        "overrides": overrides,
        "num_visual": tokens.codebook.vocab_size,
        "verbs": verbs,
        "objects": objects,
        "zero_shot_prefix": prefix,
    }
    (bundle / "meta.json").write_text(json.dumps(meta, indent=1))
    print(
        f"bundle {bundle}: {train.num_rows} training rows, {holdout.num_rows} held-out rows, {len(items)} labelled"
    )


def _write_items(items: list[Any], path: Path) -> None:
    """Zero-shot items (`evaluation.ZeroShotItem`, no clip features) as Parquet rows."""
    columns = ("video_id", "video_tokens", "verb", "object")
    schema = pa.schema(
        [
            ("video_id", pa.string()),
            ("video_tokens", pa.list_(pa.int64())),
            ("verb", pa.string()),
            ("object", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist([{k: getattr(i, k) for k in columns} for i in items], schema), path)


class PlainEngine:
    """The part of a DeepSpeed engine that `training.train_step` uses, over plain torch."""

    def __init__(self, model: Any, train: Any, device: str) -> None:
        from videobert.training import build_optimizer

        self.module, self.device, self.clip = model, device, train.grad_clip
        self.accum, self.micro = train.grad_accum, 0
        self.optimizer, self.schedule = build_optimizer(model, train)

    def __call__(self, **inputs: Any) -> Any:
        return self.module(**inputs)

    def backward(self, loss: Any) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        import torch

        self.micro += 1
        if self.micro % self.accum:
            return
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]


def run_one(bundle: str, recipe: str, overrides: list[str], seed: int, device: str) -> dict[str, Any]:
    """Train one recipe at one seed from the bundle and score it as evaluate does."""
    import torch

    from videobert.config import load_config
    from videobert.evaluation import HeldOut, ZeroShotItem, cross_modal_eval, mlm_metrics, zero_shot
    from videobert.model import JointVocab, build_model
    from videobert.text_tokenizer import TextTokenizer
    from videobert.training import micro_batch_size, replayed_batches, train_loop
    from videobert.training_examples import ExampleBuilder

    torch.set_num_threads(1)
    root = Path(bundle)
    meta = json.loads((root / "meta.json").read_text())
    config = load_config(root / "config.yaml", [*meta["overrides"], *overrides, f"train.seed={seed}"])
    tokenizer = TextTokenizer.load(str(root / "tokenizer"))
    vocab = JointVocab(tokenizer.vocab, meta["num_visual"])
    train_rows = pq.read_table(root / "train.parquet").to_pydict()
    micro = micro_batch_size(config.train, 1)
    chunks = [
        {k: v[i : i + micro] for k, v in train_rows.items()}
        for i in range(0, len(train_rows["video_id"]), micro)
    ]
    builder = ExampleBuilder(vocab, config.model.max_seq_len, config.examples, config.model.video_input)
    batches = replayed_batches(
        lambda: iter(chunks), builder.batch, (seed, 0, 0), config.train.cache_shard_rows
    )
    model = build_model(config.model.size, vocab, config.model.max_seq_len, seed=seed).to(device)
    engine = PlainEngine(model, config.train, device)
    start = time.perf_counter()
    last = train_loop(engine, batches, config.train)
    seconds = time.perf_counter() - start

    model.eval()
    heldout = pq.read_table(root / "heldout.parquet").to_pydict()
    named = heldout.pop("named")
    max_len = config.model.max_seq_len
    metrics: dict[str, Any] = {"recipe": recipe, "seed": seed, "seconds": round(seconds, 1)}
    metrics |= {f"train_{k}": v for k, v in last.items() if k != "tokens_per_s"}
    metrics |= mlm_metrics(model, vocab, HeldOut(heldout), max_len, seed=seed)
    metrics |= cross_modal_eval(model, vocab, HeldOut(heldout), max_len, named, seed=seed)[0]
    verbs, objects, prefix = meta["verbs"], meta["objects"], meta["zero_shot_prefix"]
    for name, prefix_of_metric in (("zero_shot", ""), ("train_videos", "train_")):
        items = [ZeroShotItem(**row) for row in pq.read_table(root / f"{name}.parquet").to_pylist()]
        if items:
            scored = zero_shot(model, vocab, tokenizer.encode, items, max_len, verbs, objects, prefix)[0]
            metrics |= {f"{prefix_of_metric}{k}": v for k, v in scored.items()}
    return metrics


def sweep(
    bundle: str, recipes: list[str], seeds: list[int], parallel: int, out: Path | None, device: str
) -> None:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    jobs = []
    for seed in seeds:  # seed-major: a sweep cut short still has every recipe's first seeds
        for text in recipes:
            head, _, rest = text.partition(":")
            name, _, other_bundle = head.partition("@")
            jobs.append((name, other_bundle or bundle, [s for s in rest.split(";") if s], seed))
    print(f"{len(jobs)} runs on {device}, {parallel} at a time", flush=True)
    results = []
    with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            pool.submit(run_one, path, name, over, seed, device): (name, seed)
            for name, path, over, seed in jobs
        }
        for future in as_completed(futures):
            name, seed = futures[future]
            try:
                result = future.result()
            except Exception as error:  # one broken recipe must not lose the others' results
                result = {"recipe": name, "seed": seed, "error": repr(error)}
            results.append(result)
            line = json.dumps(result, default=float)
            print(line, flush=True)
            if out is not None:
                with out.open("a") as f:
                    f.write(line + "\n")
    print_table(results)


def print_table(results: list[dict[str, Any]]) -> None:
    print("\n| recipe | seed | " + " | ".join(SHOWN) + " |")
    print("|---|---|" + "---|" * len(SHOWN))
    for r in sorted(results, key=lambda r: (r["recipe"], r["seed"])):
        cells = [f"{r[k]:.3g}" if isinstance(r.get(k), (int, float)) else str(r.get(k, "-")) for k in SHOWN]
        print(f"| {r['recipe']} | {r['seed']} | " + " | ".join(cells) + " |")
    by_recipe: dict[str, list[float]] = {}
    for r in results:
        if "zero_shot_verb_top1" in r:
            by_recipe.setdefault(r["recipe"], []).append(r["zero_shot_verb_top1"])
    for name, verbs in sorted(by_recipe.items()):
        print(
            f"{name}: held-out verbs mean {np.mean(verbs):.3f}, min {min(verbs):.3f}, over {len(verbs)} seeds"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("--config", required=True)
    ex.add_argument("--set", action="append", default=[], dest="overrides")
    ex.add_argument("--bundle", required=True, type=Path)
    sw = sub.add_parser("sweep")
    sw.add_argument("--bundle", required=True)
    sw.add_argument("--recipe", action="append", required=True, help="name[@bundle]:key=value;key=value")
    sw.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sw.add_argument("--parallel", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    sw.add_argument("--out", type=Path)
    sw.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when there is one)")
    args = parser.parse_args()
    if args.command == "export":
        export(args.config, args.overrides, args.bundle)
    else:
        sweep(args.bundle, args.recipe, args.seeds, args.parallel, args.out, args.device)


if __name__ == "__main__":
    main()
