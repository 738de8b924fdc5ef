"""One adapter from library stages to Ray Data, with one rule for sizing actor pools.

A library stage is a plain class: its constructor loads what it needs once (an encoder, a
codebook, a model) and `__call__` maps one batch (videobert.videos.ClipFeatures,
videobert.token_shards.TokenShardWriter, videobert.embedding.VideoEmbedder, ...). `map_stage`
runs it as a pool of Ray actors through `map_batches(compute=ActorPoolStrategy(...))`, and
`map_tasks` runs a plain function as Ray tasks through `compute=TaskPoolStrategy(...)`: the one
compute idiom every stage uses.

The sizing rule (`actor_pool`):
- a cluster with GPUs: one actor per GPU, each holding one GPU and one CPU;
- CPU only: one actor per node, holding that node's CPUs less what the stage's upstream tasks
  need (`reserve_cpus`, e.g. the decode tasks feeding extract's feature actors).
Never more actors than batches of work. Inside each actor torch uses as many threads as the
actor holds CPUs (at most the cores its machine has): one S3D forward on every core it paid
for, rather than one thread while the other cores idle.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from videobert.config import ExperimentConfig
    from videobert.videos import DecodedVideo


@dataclass(frozen=True)
class ActorPool:
    """How many actors a stage gets and what each one holds."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float

    @property
    def torch_threads(self) -> int:
        return max(1, math.ceil(self.cpus_per_actor))


def actor_pool(
    work_batches: int,
    reserve_cpus: float = 0.0,
    actors: int | None = None,
    cpus_per_actor: float | None = None,
) -> ActorPool:
    """The pool for `work_batches` batches of work on this cluster (see the module doc);
    `actors` and `cpus_per_actor` override the rule when a config sets them."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        count = actors or gpus
        return ActorPool(max(1, min(count, work_batches)), cpus_per_actor or 1.0, 1.0)
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    node_cpus = min((n["Resources"]["CPU"] for n in nodes), default=1.0)
    per_actor = cpus_per_actor or max(1.0, node_cpus - reserve_cpus)
    count = actors or max(1, len(nodes) * int(node_cpus // per_actor))
    return ActorPool(max(1, min(count, work_batches)), per_actor, 0.0)


def _with_torch_threads(stage: type, threads: int) -> type:
    """`stage`, whose actors first set torch's thread count to their CPU allotment."""

    class Stage(stage):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            import torch

            # Ray pins OMP_NUM_THREADS to the actor's CPUs only for whole numbers, and a
            # local instance may count more logical CPUs than the machine has cores.
            torch.set_num_threads(min(threads, os.cpu_count() or threads))
            super().__init__(*args, **kwargs)

    Stage.__name__ = Stage.__qualname__ = stage.__name__
    return Stage


def map_stage(
    dataset: Any,
    stage: type,
    pool: ActorPool,
    batch_size: int | None,
    batch_format: str = "numpy",
    **constructor_kwargs: Any,
) -> Any:
    """`dataset.map_batches` with `stage` on an actor pool sized by `pool`."""
    import ray.data

    return dataset.map_batches(
        _with_torch_threads(stage, pool.torch_threads),
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=batch_size,
        batch_format=batch_format,
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.cpus_per_actor,
        num_gpus=pool.gpus_per_actor,
    )


def flat_map_tasks(
    dataset: Any,
    fn: Callable[..., Any],
    max_tasks: int | None,
    cpus_per_task: float = 1.0,
    memory_per_task: int | None = None,
    max_retries: int = -1,
    **kwargs: Any,
) -> Any:
    """`dataset.flat_map(fn)` as Ray tasks, at most `max_tasks` at once (None: as the cluster
    allows), each declaring `memory_per_task` bytes and retried at most `max_retries` times
    when its worker dies (-1: Ray Data's default, forever)."""
    import ray.data

    return dataset.flat_map(
        fn,
        fn_kwargs=kwargs,
        compute=ray.data.TaskPoolStrategy(size=max_tasks),
        num_cpus=cpus_per_task,
        memory=memory_per_task,
        ray_remote_args_fn=lambda: {"max_retries": max_retries},
    )


FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FILES_PER_FOOTER_ACTOR = 256


def read_parquet_files(paths: list[str], filesystem: Any, columns: list[str]) -> Any:
    """`ray.data.read_parquet` over these files, with its footer readers sized to them.

    Ray Data's Parquet reader (V2) lists files by reading their footers on a pool of
    `FooterReader` actors, 32 by default, each a new worker process: for our tens of feature
    files or token shards that is seconds of process start-up per read on a small node (12
    small files: 6.2 s a read, against 1.5 s with one actor; benchmarks/bench_parquet_read.py).
    One actor per FILES_PER_FOOTER_ACTOR files keeps large reads parallel; a value the user set
    in the environment wins. The reader takes the count when the read is planned, here."""
    import ray

    if FOOTER_ACTORS_ENV in os.environ:
        return ray.data.read_parquet(paths, filesystem=filesystem, columns=columns)
    os.environ[FOOTER_ACTORS_ENV] = str(min(32, max(1, math.ceil(len(paths) / FILES_PER_FOOTER_ACTOR))))
    try:
        return ray.data.read_parquet(paths, filesystem=filesystem, columns=columns)
    finally:
        del os.environ[FOOTER_ACTORS_ENV]


def map_tasks(
    dataset: Any, fn: Callable[..., Any], batch_size: int | None, batch_format: str = "numpy"
) -> Any:
    """`dataset.map_batches(fn)` as Ray tasks (a plain function, nothing to load once)."""
    import ray.data

    return dataset.map_batches(
        fn, batch_size=batch_size, batch_format=batch_format, compute=ray.data.TaskPoolStrategy()
    )


def decoded_videos(
    config: ExperimentConfig, videos: list[dict[str, Any]], stage: type, **stage_kwargs: Any
) -> Iterator[DecodedVideo]:
    """`videos` through `decoded_clips`, each regrouped on the driver as soon as all its rows
    arrived; one whose decode kept dying comes out as an error (see `decoded_clips`)."""
    from videobert.videos import gather_videos

    dataset = decoded_clips(config, videos, stage, **stage_kwargs)
    tries = config.extract.decode_max_retries + 1
    batches = dataset.iter_batches(batch_size=None, batch_format="numpy")
    yield from gather_videos(batches, "decode", [v["video_id"] for v in videos], tries)


def decoded_clips(
    config: ExperimentConfig, videos: list[dict[str, Any]], stage: type, **stage_kwargs: Any
) -> Any:
    """The video plan that extract and embed share (videobert/videos.py):

        from_items(videos)            one block per video
          .flat_map(decode_video)     decode tasks: a row per clip, then one END row per video
          .map_batches(stage)         `stage` actors (ClipFeatures, ClipWords) over the clip rows

    On CPU-only nodes the actors leave `extract.cpus_per_decode_task` CPUs for each of the
    `extract.decode_concurrency` (default 1) decode tasks that feed them. A decode task
    declares `extract.decode_memory_mb` and is retried `extract.decode_max_retries` times when
    its worker dies (killed for memory, a lost node); then its video's rows are missing, the
    dataset goes on (one errored block per video is allowed), and `gather_videos` records the
    video as an error.
    """
    import ray.data

    from videobert.videos import decode_video

    extract = config.extract
    reserve = extract.cpus_per_decode_task * (extract.decode_concurrency or 1)
    pool = actor_pool(len(videos), reserve, extract.feature_actors, extract.cpus_per_feature_actor)
    dataset = ray.data.from_items(videos, override_num_blocks=len(videos))
    dataset = flat_map_tasks(
        dataset,
        decode_video,
        extract.decode_concurrency,
        extract.cpus_per_decode_task,
        extract.decode_memory_mb * 2**20,
        extract.decode_max_retries,
        decode=config.decode,
        s3=config.s3,
    )
    dataset = map_stage(
        dataset,
        stage,
        pool,
        config.encoder.clips_per_batch,
        encoder=config.encoder,
        decode=config.decode,
        s3=config.s3,
        **stage_kwargs,
    )
    dataset.context.max_errored_blocks = len(videos)  # a video whose decode keeps dying is a row
    return dataset


VIDEOS_PER_TOKEN_BATCH = 8


def tokenized_videos(
    config: ExperimentConfig, items: list[dict[str, str]], codebook_uri: str, tokenizer_uri: str
) -> list[dict[str, Any]]:
    """`items` (video_id, transcript_uri) through `TokenShardWriter` actors, which write their
    token files under `config.output`; returns one status row per video. Tokenize runs it over
    the corpus and evaluate over the labelled videos, so both are tokenized by one code path."""
    import ray.data

    from videobert.token_shards import TokenShardWriter

    num_batches = -(-len(items) // VIDEOS_PER_TOKEN_BATCH)
    return map_stage(
        ray.data.from_items(items),
        TokenShardWriter,
        actor_pool(num_batches),
        VIDEOS_PER_TOKEN_BATCH,
        output=config.output,
        codebook_uri=codebook_uri,
        tokenizer_uri=tokenizer_uri,
        segment_tokens=config.tokenize.segment_tokens,
        sentence_gap_s=config.tokenize.sentence_gap_s,
        max_transcript_bytes=config.tokenize.max_transcript_bytes,
        s3=config.s3,
    ).take_all()
