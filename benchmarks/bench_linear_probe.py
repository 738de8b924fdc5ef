"""What the clip features carry: a linear probe held out by video, the ceiling for zero-shot.

Reads what `videobert extract` and `fit-codebook` wrote under the config's `output` (the
features of every video, the newest codebook) and a label per video, then trains a linear
softmax classifier per label column (e.g. verb, object) in k folds grouped by video, and
scores each held-out video by its clips' summed log-probabilities. Two inputs:

- the clip features themselves: the ceiling under this encoder and decode setting;
- the clip's visual word (one-hot): the ceiling under the codebook, i.e. what quantisation keeps.

The model's zero-shot accuracy (the `eval.zero_shot_<label>_top1` tag of `--model-uri`'s
version) is then printed as a ratio to the feature ceiling: issue 13's verb goal is 2x chance,
or 90% of this ceiling where the ceiling is lower. The probe uses fixed settings (no tuning
on the held-out folds), so it is a floor on the true ceiling.

    python benchmarks/bench_linear_probe.py --config configs/demo.yaml \\
        --model-uri models:/videobert@champion

Labels: `--labels` (CSV or Parquet with source_uri and one column per label), or by default
the demo corpus's own plan (`demo` section of the config): every generated video's verb and
object, not only the labelled evaluation set's.
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from videobert import storage
from videobert.codebook import HierarchicalCodebook, latest_codebook
from videobert.config import ExperimentConfig, load_config
from videobert.tables import Layout, read_manifest


def demo_labels(config: ExperimentConfig) -> dict[str, dict[str, str]]:
    """file stem -> {verb, object} for every video the demo corpus generates."""
    from videobert.demo_corpus import DemoSpec, plan_corpus

    spec = DemoSpec(config.demo.objects, config.demo.actions, config.demo.videos_per_class, config.demo.seed)
    return {v.stem: {"verb": v.verb, "object": v.object} for v in plan_corpus(spec)}


def table_labels(uri: str, config: ExperimentConfig) -> dict[str, dict[str, str]]:
    """source_uri -> {column: value} from a CSV or Parquet table."""
    data = storage.read_bytes(uri, config.s3)
    table = pq.read_table(io.BytesIO(data)) if uri.endswith(".parquet") else pacsv.read_csv(io.BytesIO(data))
    rows = table.to_pylist()
    return {str(r.pop("source_uri")): {k: str(v) for k, v in r.items()} for r in rows}


def load_clips(
    config: ExperimentConfig, labels: dict[str, dict[str, str]], by_stem: bool
) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """(clip features [N, D] float32, video index per clip [N], label dict per video)."""
    manifest = read_manifest(config.output, config.s3).to_pylist()
    features, video_of, video_labels = [], [], []
    for row in sorted(manifest, key=lambda r: r["source_uri"]):
        if row["status"] != "ok":
            continue
        key = os.path.splitext(os.path.basename(row["source_uri"]))[0] if by_stem else row["source_uri"]
        if key not in labels:
            continue
        uri = Layout(config.output).features_file(row["video_id"])
        table = storage.read_parquet(uri, config.s3, columns=["feature"])
        clips = np.asarray(table["feature"].to_pylist(), np.float32)
        if not len(clips):
            continue
        features.append(clips)
        video_of.append(np.full(len(clips), len(video_labels)))
        video_labels.append(labels[key])
    if not video_labels:
        raise SystemExit(f"no labelled video with features under {config.output}: run extract first")
    return np.concatenate(features), np.concatenate(video_of), video_labels


def probe_accuracy(
    x: np.ndarray, video_of: np.ndarray, targets: np.ndarray, folds: int, steps: int = 300
) -> float:
    """Video-level accuracy of a linear softmax probe, k folds grouped by video."""
    num_videos, num_classes = int(video_of.max()) + 1, int(targets.max()) + 1
    fold_of = np.random.default_rng(0).permutation(num_videos) % folds
    hits = 0
    for fold in range(folds):
        train = fold_of[video_of] != fold
        mean, std = x[train].mean(0), x[train].std(0) + 1e-6
        xs = torch.tensor((x - mean) / std)
        torch.manual_seed(fold)
        linear = torch.nn.Linear(x.shape[1], num_classes)
        optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-2, weight_decay=1e-3)
        y = torch.tensor(targets[video_of])
        train_t = torch.tensor(train)
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(linear(xs[train_t]), y[train_t]).backward()
            optimizer.step()
        with torch.no_grad():
            log_probs = torch.log_softmax(linear(xs), -1).numpy()
        for v in np.flatnonzero(fold_of == fold):
            hits += int(log_probs[video_of == v].sum(0).argmax() == targets[v])
    return hits / num_videos


def zero_shot_tags(config: ExperimentConfig, model_uri: str) -> dict[str, float]:
    from mlflow import MlflowClient

    from videobert.registry import resolve_model_version
    from videobert.tracking import tracking_uri, use_tracking_uri

    use_tracking_uri(tracking_uri(config))
    info = resolve_model_version(model_uri)
    tags = MlflowClient().get_model_version(info.name, info.version).tags
    return {k.removeprefix("eval."): float(v) for k, v in tags.items() if k.startswith("eval.zero_shot")}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--labels", help="CSV/Parquet: source_uri + label columns (default: the demo plan)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--model-uri", help="a version whose eval.zero_shot_* tags to compare")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    labels = table_labels(args.labels, config) if args.labels else demo_labels(config)
    start = time.perf_counter()
    x, video_of, video_labels = load_clips(config, labels, by_stem=not args.labels)
    codebook_uri = latest_codebook(config.output, config.s3, config.codebook.k, config.codebook.depth)
    words = None
    if codebook_uri is not None:
        codebook = HierarchicalCodebook.load(codebook_uri, config.s3)
        words = np.eye(codebook.vocab_size, dtype=np.float32)[codebook.assign(x)]
    zero_shot = zero_shot_tags(config, args.model_uri) if args.model_uri else {}
    print(f"{len(video_labels)} videos, {len(x)} clips of {x.shape[1]} features, {args.folds} folds by video")
    print(
        "| label | classes | chance | probe on features (ceiling) | probe on visual words | zero-shot | zero-shot / ceiling |"
    )
    print("|---|---|---|---|---|---|---|")
    for column in sorted(video_labels[0]):
        classes = sorted({v[column] for v in video_labels})
        targets = np.asarray([classes.index(v[column]) for v in video_labels])
        ceiling = probe_accuracy(x, video_of, targets, args.folds)
        on_words = probe_accuracy(words, video_of, targets, args.folds) if words is not None else float("nan")
        zs = zero_shot.get(f"zero_shot_{column}_top1", float("nan"))
        print(
            f"| {column} | {len(classes)} | {1 / len(classes):.3f} | {ceiling:.3f} | {on_words:.3f} "
            f"| {zs:.3f} | {zs / ceiling if ceiling else float('nan'):.2f}x |"
        )
    print(f"({time.perf_counter() - start:.1f} s; codebook {codebook_uri})")


if __name__ == "__main__":
    pa.set_cpu_count(max(1, os.cpu_count() or 1))
    main()
