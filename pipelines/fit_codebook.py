"""`videobert fit-codebook`: sample committed clip features, fit the hierarchical k-means codebook.

1. Reuse: unless `codebook.refit`, the newest codebook with this k and depth is kept.
2. Sample: Ray Data reads the features files of the `ok` videos in the manifest and keeps a
   deterministic uniform sample of up to `codebook.sample_size` clips: every clip gets a
   seeded hash score and the lowest scores win (the same sample whatever the block order,
   so refitting gives the same codebook version).
3. Fit: one Ray task (on a GPU when the cluster has one) runs `HierarchicalCodebook.fit`.
4. Write `codebook/<version>/` (centroids + codebook.json) and the gallery beside it, and log
   all of it to MLflow in a run of its own.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.common import init_ray, stage_main
from videobert import storage
from videobert.codebook import GALLERY_FILE, HierarchicalCodebook, latest_codebook
from videobert.config import ExperimentConfig
from videobert.gallery import ClipRef, gallery_png
from videobert.tables import Layout, read_manifest
from videobert.token_shards import features_array
from videobert.tracking import setup_experiment

log = logging.getLogger("videobert.fit_codebook")

MASK64 = (1 << 64) - 1


def sample_scores(video_ids: list[str], clip_indices: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) score per clip from (seed, video_id, clip_index): splitmix64 in numpy."""
    ids = np.array([int(v, 16) & MASK64 for v in video_ids], dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = ids ^ (clip_indices.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(seed & MASK64)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def sample_features(config: ExperimentConfig, manifest: pa.Table) -> pa.Table:
    """Up to sample_size rows (video_id, clip_index, start_s, end_s, feature, score) via Ray Data."""
    import ray

    ok = manifest.filter(pc.equal(manifest.column("status"), "ok"))
    layout = Layout(config.output)
    written = {storage.stem(f) for f in storage.list_files(layout.features, config.s3, suffix=".parquet")}
    files = [layout.features_file(v) for v in ok.column("video_id").to_pylist() if v in written]
    if not files:
        raise storage.StorageError(
            f"no committed features under {layout.features}: run `videobert extract` first"
        )
    total = sum(n or 0 for n in ok.column("num_clips").to_pylist())
    wanted = config.codebook.sample_size
    # Keep a little more than the expected share so the final cut rarely comes up short.
    keep_below = 1.0 if total <= wanted else min(1.0, (wanted + 4 * math.sqrt(wanted) + 16) / total)
    seed = config.codebook.seed

    def score(batch: pa.Table) -> pa.Table:
        scores = sample_scores(
            batch.column("video_id").to_pylist(), batch.column("clip_index").to_numpy(), seed
        )
        batch = batch.append_column("score", pa.array(scores))
        return batch.filter(pc.less(batch.column("score"), keep_below))

    fs, _ = storage.filesystem(config.output, config.s3)
    paths = [storage.filesystem(f, config.s3)[1] for f in files]
    dataset = ray.data.read_parquet(
        paths, filesystem=fs, columns=["video_id", "clip_index", "start_s", "end_s", "feature"]
    ).map_batches(score, batch_format="pyarrow")
    tables = [table for table in ray.get(dataset.to_arrow_refs()) if table.num_rows]
    if not tables:
        raise storage.StorageError(f"the features under {layout.features} hold no clips")
    sample = pa.concat_tables(tables)
    order = pc.sort_indices(
        sample, [("score", "ascending"), ("video_id", "ascending"), ("clip_index", "ascending")]
    )
    return sample.take(order[:wanted])


def fit_on_cluster(
    config: ExperimentConfig, features: np.ndarray, encoder: str | None
) -> HierarchicalCodebook:
    """Fit in a Ray task on a GPU when the cluster has one; else here, in the driver.

    A CPU-only cluster gains nothing from shipping the sample to a fresh worker (which must
    import torch first): the driver already holds the sample and torch.
    """
    import ray

    c = config.codebook
    kwargs = {
        "k": c.k,
        "depth": c.depth,
        "seed": c.seed,
        "iterations": c.iterations,
        "encoder": encoder,
        "max_points_per_centroid": c.max_points_per_centroid,
        "init_trials": c.init_trials,
    }
    if ray.cluster_resources().get("GPU", 0) < 1:
        return HierarchicalCodebook.fit(features, **kwargs)
    task = ray.remote(num_gpus=1, num_cpus=1)(HierarchicalCodebook.fit)
    return ray.get(task.remote(features, **kwargs))


def _encoder_of(manifest: pa.Table) -> str | None:
    encoders = sorted({e for e in manifest.column("encoder").to_pylist() if e})
    if len(encoders) > 1:
        log.warning("features come from several encoders %s; fitting on all of them", encoders)
    return ",".join(encoders) or None


def write_gallery(
    config: ExperimentConfig,
    codebook: HierarchicalCodebook,
    sample: pa.Table,
    manifest: pa.Table,
    features: np.ndarray,
    directory: str,
) -> bytes:
    from videobert.decode import read_frame

    source = dict(
        zip(manifest.column("video_id").to_pylist(), manifest.column("source_uri").to_pylist(), strict=True)
    )
    refs = [
        ClipRef(source.get(v, ""), s, e)
        for v, s, e in zip(
            sample.column("video_id").to_pylist(),
            sample.column("start_s").to_pylist(),
            sample.column("end_s").to_pylist(),
            strict=True,
        )
    ]
    png = gallery_png(
        codebook,
        features,
        refs,
        lambda uri, time_s, size: read_frame(uri, time_s, size, config.s3),
        words=config.codebook.gallery_words,
    )
    storage.write_bytes(storage.join(directory, GALLERY_FILE), png, config.s3)
    return png


def log_to_mlflow(
    config: ExperimentConfig, codebook: HierarchicalCodebook, directory: str, png: bytes
) -> str:
    """A run of its own with the codebook's params, inertia and files; returns the run id."""
    import mlflow

    setup_experiment(config)
    meta = codebook.metadata_json()
    with mlflow.start_run(run_name=f"{config.name}-codebook-{codebook.version}") as run:
        mlflow.set_tags(
            {"stage": "fit-codebook", "codebook_version": codebook.version, "codebook_uri": directory}
        )
        mlflow.log_params(
            {
                "k": codebook.k,
                "depth": codebook.depth,
                "dim": codebook.dim,
                "sample_size": meta["sample_size"],
                "seed": meta["seed"],
                "iterations": meta["iterations"],
                "max_points_per_centroid": meta.get("max_points_per_centroid"),
                "init_trials": meta.get("init_trials"),
                "encoder": meta.get("encoder"),
            }
        )
        metrics = {f"inertia_level_{i}": value for i, value in enumerate(codebook.inertia_per_level)}
        mlflow.log_metrics({**metrics, "fit_seconds": meta["fit_seconds"]})
        with tempfile.TemporaryDirectory() as local:
            codebook.save(local)
            with open(os.path.join(local, GALLERY_FILE), "wb") as handle:
                handle.write(png)
            mlflow.log_artifacts(local, artifact_path="codebook")
        return run.info.run_id


def run(config: ExperimentConfig) -> dict[str, Any]:
    c = config.codebook
    existing = latest_codebook(config.output, config.s3, k=c.k, depth=c.depth)
    if existing and not c.refit:
        version = existing.rstrip("/").rsplit("/", 1)[-1]
        log.info("reusing codebook %s (set codebook.refit=true to fit a new one)", existing)
        return {"codebook_uri": existing, "codebook_version": version, "reused": True}
    manifest = read_manifest(config.output, config.s3)
    init_ray()
    sample = sample_features(config, manifest)
    features = features_array(sample)
    log.info("fitting k=%d depth=%d on %d sampled clips", c.k, c.depth, len(features))
    codebook = fit_on_cluster(config, features, _encoder_of(manifest))
    directory = Layout(config.output).codebook(codebook.version)
    png = write_gallery(config, codebook, sample, manifest, features, directory)
    codebook.save(directory, config.s3)  # codebook.json last: it marks the codebook complete
    run_id = log_to_mlflow(config, codebook, directory, png)
    log.info(
        "codebook %s written to %s (inertia per level %s)",
        codebook.version,
        directory,
        codebook.inertia_per_level,
    )
    return {
        "codebook_uri": directory,
        "codebook_version": codebook.version,
        "reused": False,
        "sample_size": len(features),
        "inertia_per_level": codebook.inertia_per_level,
        "mlflow_run_id": run_id,
    }


def main(argv: list[str] | None = None) -> int:
    return stage_main("fit-codebook", run, argv)


if __name__ == "__main__":
    sys.exit(main())
