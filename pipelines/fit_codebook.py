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
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.common import init_ray, stage_main
from pipelines.ray_stages import map_tasks, read_parquet_files
from videobert import storage
from videobert.codebook import (
    HierarchicalCodebook,
    cut_sample,
    encoders_of,
    fit_settings,
    sample_threshold,
    scored_clips,
)
from videobert.config import ExperimentConfig
from videobert.gallery import write_gallery
from videobert.results import CodebookResult, MissingInputError, find_codebook
from videobert.tables import Layout, read_manifest
from videobert.token_shards import features_array
from videobert.tracking import log_codebook_run

log = logging.getLogger("videobert.fit_codebook")


def sample_features(config: ExperimentConfig, manifest: pa.Table) -> pa.Table:
    """Up to sample_size rows (video_id, clip_index, start_s, end_s, feature, score) via Ray Data."""
    import ray

    ok = manifest.filter(pc.equal(manifest.column("status"), "ok"))
    layout = Layout(config.output)
    written = {storage.stem(f) for f in storage.list_files(layout.features, config.s3, suffix=".parquet")}
    files = [layout.features_file(v) for v in ok.column("video_id").to_pylist() if v in written]
    if not files:
        raise MissingInputError(
            f"no committed features under {layout.features}: run `videobert extract` first"
        )
    wanted, seed = config.codebook.sample_size, config.codebook.seed
    keep_below = sample_threshold(sum(n or 0 for n in ok.column("num_clips").to_pylist()), wanted)
    fs, _ = storage.filesystem(config.output, config.s3)
    paths = [storage.filesystem(f, config.s3)[1] for f in files]
    columns = ["video_id", "clip_index", "start_s", "end_s", "feature"]
    dataset = map_tasks(
        read_parquet_files(paths, fs, columns),
        lambda batch: scored_clips(batch, seed, keep_below),
        None,
        "pyarrow",
    )
    scored = [table for table in ray.get(dataset.to_arrow_refs()) if table.num_rows]
    if not scored:
        raise MissingInputError(f"the features under {layout.features} hold no clips")
    return cut_sample(scored, wanted)


def fit_on_cluster(
    config: ExperimentConfig, features: np.ndarray, encoder: str | None
) -> HierarchicalCodebook:
    """Fit in a Ray task on a GPU when the cluster has one; else here, in the driver.

    A CPU-only cluster gains nothing from shipping the sample to a fresh worker (which must
    import torch first): the driver already holds the sample and torch.
    """
    import ray

    settings = fit_settings(config.codebook, encoder)
    if ray.cluster_resources().get("GPU", 0) < 1:
        return HierarchicalCodebook.fit(features, **settings)
    task = ray.remote(num_gpus=1, num_cpus=1)(HierarchicalCodebook.fit)
    return ray.get(task.remote(features, **settings))


def run(config: ExperimentConfig) -> CodebookResult:
    """Reuse the codebook with this k and depth, or fit one (see the module doc)."""
    c = config.codebook
    existing = find_codebook(config)
    if existing is not None and not c.refit:
        log.info("reusing codebook %s (set codebook.refit=true to fit a new one)", existing.uri)
        return existing
    manifest = read_manifest(config.output, config.s3)
    init_ray()
    sample = sample_features(config, manifest)
    features = features_array(sample)
    log.info("fitting k=%d depth=%d on %d sampled clips", c.k, c.depth, len(features))
    codebook = fit_on_cluster(config, features, encoders_of(manifest))
    directory = Layout(config.output).codebook(codebook.version)
    png = write_gallery(config, codebook, sample, manifest, features, directory)
    codebook.save(directory, config.s3)  # codebook.json last: it marks the codebook complete
    run_id = log_codebook_run(config, codebook, directory, png)
    log.info(
        "codebook %s written to %s (inertia per level %s)",
        codebook.version,
        directory,
        codebook.inertia_per_level,
    )
    return CodebookResult(
        uri=directory,
        version=codebook.version,
        vocab_size=codebook.vocab_size,
        reused=False,
        sample_size=len(features),
        inertia_per_level=tuple(codebook.inertia_per_level),
        mlflow_run_id=run_id,
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("fit-codebook", run, argv)


if __name__ == "__main__":
    sys.exit(main())
