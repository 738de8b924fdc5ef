"""Hierarchical k-means visual-word codebook (VideoBERT: depth 4, k 12 -> 20,736 words).

Level 0 clusters every feature into k groups; each group is clustered again into k, and so
on for `depth` levels. Level `l` holds k**l nodes with k child centroids each, stored as a
tensor of shape (k**l, k, dim). A feature descends the tree, compared with only k centroids
per level, and its word id is the leaf index:

    word = sum(index_at_level[l] * k ** (depth - 1 - l))

so `word // k ** (depth - 1 - l)` is the node it reached after level l (its prefix).

Assignment works on chunks of rows (~32 MB of float32). Per level, rows are sorted by the node they
reached; a node with many rows gets one matmul against its k children, and the rows of all
the small nodes go through a few batched matmuls (groups padded to a power-of-two size), so
the Python loop runs over big nodes only. Squared centroid norms are computed once per
codebook, not per call.

Fitting runs one level at a time on the flat k-means kernels of `videobert.kmeans` (plain
torch, GPU when there is one), seeded per node, or per batch of nodes. Nodes with at most
BATCH_FIT_ROWS points (at depth 4 on 30,000 points, all but 13 of 1,885) are fitted together
by `kmeans_batched`; bigger nodes get one `kmeans` each. Optionally a node trains on a seeded
random subsample of `max_points_per_centroid * k` points (faiss's rule) and then labels all of
them. A node with fewer points than k keeps its points as centroids (padded by
repetition); a node with no points copies its parent's centroid, so every word id stays
reachable and assignment never fails.

Saved as `centroids.safetensors` (one tensor per level) + `codebook.json` (metadata). The
version is a content hash of k, depth and the centroids, so refitting the same sample with
the same seed gives the same version.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from videobert import storage, versions
from videobert.config import CodebookConfig, S3Config
from videobert.kmeans import distance_scores, kmeans, kmeans_batched, nearest, squared_norms
from videobert.tables import Layout

log = logging.getLogger(__name__)

CENTROIDS_FILE = "centroids.safetensors"
METADATA_FILE = "codebook.json"
GALLERY_FILE = "gallery.png"
# Tuning measured on a 2-core EPYC (32 MB L3); the k-means kernels' own is in kmeans.py.
# Fit: nodes with at most BATCH_FIT_ROWS points are fitted together, about
# BATCH_FIT_ELEMENTS floats of gathered rows per batch: at depth 4 (30,000 x 256) levels 2-3
# took ~3.3 s node by node and take ~0.25 s batched; at dim 1024 the deepest level is 2.6x
# faster batched. Nodes of ~700 rows at dim 1024 are as fast either way, and of 2,500 rows
# at dim 256 5-10% slower batched: their padded batch outgrows the cache.
BATCH_FIT_ROWS = 1024
BATCH_FIT_ELEMENTS = 1 << 23
# Assignment: each level visits all rows grouped by node (one argsort of the whole input per
# level), gathered in chunks of about CHUNK_BYTES of float32, so a deep node's rows stay
# together whatever the chunk size (at depth 4, dim 1024, 4-32 MB chunks are within 10%). A
# node with rows * dim >= SMALL_NODE_ELEMENTS takes one addmm on its slice; smaller ones share
# batched matmuls of about BMM_ELEMENTS floats (the threshold is in elements because the
# per-call overhead matters less at larger dim: 32 rows is best at dim 256, 1-8 rows at dim 1024).
CHUNK_BYTES = 32 << 20
SMALL_NODE_ELEMENTS = 1 << 13
BMM_ELEMENTS = 1 << 22


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_tensor(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    """`features` as a tensor, sharing memory with it where torch can."""
    if isinstance(features, np.ndarray):
        if not features.flags.writeable:
            features = features.copy()  # torch warns on read-only arrays (e.g. from Arrow)
        return torch.as_tensor(features)
    return features


def _as_float_tensor(features: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    tensor = _as_tensor(features)
    if tensor.ndim != 2:
        raise ValueError(f"features must be 2-d (N, dim), got shape {tuple(tensor.shape)}")
    return tensor.to(device=device, dtype=torch.float32)


def _descend(
    x: torch.Tensor,
    node: torch.Tensor,
    centroids: torch.Tensor,
    centroid_bias: torch.Tensor,
) -> torch.Tensor:
    """Child index (n,) of each row of x (n, dim) under the node (n,) it reached.

    Rows must come grouped by node (`node` sorted), so a node's rows are one contiguous
    slice of x. `centroids` (nodes, k, dim) and `centroid_bias` (nodes, k) are one level's.
    """
    if centroids.shape[0] == 1:  # the root: one matmul, no grouping
        return distance_scores(x, centroids[0], centroid_bias[0]).min(0).indices
    k, dim = centroids.shape[1], centroids.shape[2]
    nodes, counts = torch.unique_consecutive(node, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.empty_like(node)
    big = counts * dim >= SMALL_NODE_ELEMENTS
    # Big nodes: one addmm over their slice of x, no copy.
    for parent, start, count in zip(
        nodes[big].tolist(), starts[big].tolist(), counts[big].tolist(), strict=True
    ):
        part = slice(start, start + count)
        local[part] = distance_scores(x[part], centroids[parent], centroid_bias[parent]).min(0).indices
    if not bool(big.all()):
        # Small nodes: groups padded to the next power of two, one baddbmm per size (and per
        # BMM_ELEMENTS). Padding repeats a group's last row.
        s_nodes, s_counts, s_starts = nodes[~big], counts[~big], starts[~big]
        padded = 1 << torch.ceil(torch.log2(s_counts.to(torch.float64))).to(torch.long)
        for size in torch.unique(padded).tolist():
            groups = torch.nonzero(padded == size).flatten()
            offsets = torch.arange(size, device=x.device)
            per_call = max(1, BMM_ELEMENTS // ((size + k) * dim))
            for begin in range(0, len(groups), per_call):
                g = groups[begin : begin + per_call]
                g_nodes, g_counts = s_nodes[g], s_counts[g]
                rows = s_starts[g][:, None] + torch.minimum(offsets[None, :], g_counts[:, None] - 1)
                distances = torch.baddbmm(  # (groups, size, k)
                    centroid_bias[g_nodes][:, None, :],
                    x[rows],
                    centroids[g_nodes].transpose(1, 2),
                    alpha=-2.0,
                )
                valid = offsets[None, :] < g_counts[:, None]
                local[rows[valid]] = distances.argmin(-1)[valid]
    return local


def _node_seed(seed: int, level: int, node: int, tag: str = "") -> int:
    digest = hashlib.sha256(f"{seed}:{level}:{node}{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _runs(counts: list[int], dim: int) -> list[tuple[int, int]]:
    """Split nodes sorted by ascending count into [begin, end) runs, each fitted as one batch.

    A run is padded to its largest count, so it takes counts within 25% (or 8 rows) of its
    smallest, and at most about BATCH_FIT_ELEMENTS floats of gathered rows.
    """
    runs = []
    begin = 0
    while begin < len(counts):
        ceiling = max(counts[begin] * 5 // 4, counts[begin] + 8)
        end = begin + 1
        while (
            end < len(counts)
            and counts[end] <= ceiling
            and (end + 1 - begin) * counts[end] * dim <= BATCH_FIT_ELEMENTS
        ):
            end += 1
        runs.append((begin, end))
        begin = end
    return runs


def _fit_level(
    x: torch.Tensor,
    node_of: torch.Tensor,
    parents: torch.Tensor | None,
    level: int,
    k: int,
    seed: int,
    iterations: int,
    max_points_per_centroid: int | None,
    init_trials: int | None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Fit every node of one level: (centroids (k**level, k, dim), child node of each row, inertia sum).

    `parents` is the previous level's centroids (None at the root).
    """
    n, dim = x.shape
    device = x.device
    centroids = torch.empty(k**level, k, dim, device=device)
    next_node = torch.empty_like(node_of)
    order = torch.argsort(node_of, stable=True)
    nodes, counts = torch.unique_consecutive(node_of[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    inertia = 0.0

    # No sample point reached the node: copy the parent's centroid, so its words stay reachable.
    reached = torch.zeros(k**level, dtype=torch.bool, device=device)
    reached[nodes] = True
    if parents is not None and not bool(reached.all()):
        unreached = torch.nonzero(~reached).flatten()
        centroids[unreached] = parents.reshape(-1, dim)[unreached][:, None, :].expand(-1, k, dim)

    # At most k points: each point is its own centroid (padded by repetition), inertia 0.
    few = counts <= k
    if bool(few.any()):
        f_nodes, f_counts, f_starts = nodes[few], counts[few], starts[few]
        slots = f_starts[:, None] + torch.arange(k, device=device)[None, :] % f_counts[:, None]
        centroids[f_nodes] = x[order[slots]]
        position = torch.arange(n, device=device) - torch.repeat_interleave(starts, counts)
        in_few = torch.repeat_interleave(few, counts)
        next_node[order[in_few]] = node_of[order[in_few]] * k + position[in_few]

    # A node trains on its first `train` rows in `order`. With max_points_per_centroid, a
    # bigger node's rows are reordered so that its first k * max_points_per_centroid are a
    # random subset (seeded per node; faiss's rule), and it is labelled in full afterwards.
    # Both parts stay in ascending row order: gathers then stream through x.
    limit = k * max_points_per_centroid if max_points_per_centroid else n
    train = counts.clamp_max(limit)
    subsampled = torch.nonzero(counts > limit).flatten().tolist()
    for i in subsampled:
        start, count = int(starts[i]), int(counts[i])
        generator = torch.Generator(device=device).manual_seed(
            _node_seed(seed, level, int(nodes[i]), ":sample")
        )
        picked = torch.zeros(count, dtype=torch.bool, device=device)
        picked[torch.randperm(count, generator=generator, device=device)[:limit]] = True
        segment = order[start : start + count]
        order[start : start + count] = torch.cat([segment[picked], segment[~picked]])
    fully = counts <= limit  # trained on all its rows: the fit's labels and inertia are final

    # Small training sets: fitted together, in padded batches of similar sizes (see _runs).
    small = torch.nonzero(~few & (train <= BATCH_FIT_ROWS)).flatten()
    small = small[torch.argsort(train[small], stable=True)]
    for begin, end in _runs(train[small].tolist(), dim):
        run = small[begin:end]
        r_nodes, r_train, r_starts = nodes[run], train[run], starts[run]
        offsets = torch.arange(int(r_train[-1]), device=device)
        # Padding slots repeat the node's last training row (masked out of every sum).
        rows = order[r_starts[:, None] + torch.minimum(offsets[None, :], r_train[:, None] - 1)]
        generator = torch.Generator(device=device).manual_seed(
            _node_seed(seed, level, int(r_nodes[0]), ":batch")
        )
        r_centroids, labels, r_inertia = kmeans_batched(
            x, rows, r_train, k, generator, iterations, init_trials=init_trials
        )
        centroids[r_nodes] = r_centroids
        final = (offsets[None, :] < r_train[:, None]) & fully[run][:, None]
        next_node[rows[final]] = (r_nodes[:, None] * k + labels)[final]
        inertia += float(r_inertia[fully[run]].sum())

    # Large training sets: one `kmeans` each (their matmuls are big enough on their own).
    large = torch.nonzero(~few & (train > BATCH_FIT_ROWS)).flatten().tolist()
    for i in large:
        node, start = int(nodes[i]), int(starts[i])
        rows = order[start : start + int(train[i])]
        generator = torch.Generator(device=device).manual_seed(_node_seed(seed, level, node))
        # The root holds every row, in order: use x itself rather than a copy of it.
        points = x if len(rows) == n else x.index_select(0, rows)
        centroids[node], labels, node_inertia = kmeans(
            points, k, generator, iterations, init_trials=init_trials
        )
        if bool(fully[i]):
            next_node[rows] = node * k + labels
            inertia += node_inertia

    # Subsampled nodes: label every row by its node's centroids, a chunk of rows at a time
    # through one reused buffer (a fresh copy of a big node costs more in page faults).
    chunk = max(1024, CHUNK_BYTES // (4 * dim))
    buffer = torch.empty((min(chunk, n), dim), device=device) if subsampled else None
    for i in subsampled:
        node, start, count = int(nodes[i]), int(starts[i]), int(counts[i])
        for begin in range(start, start + count, chunk):
            end = min(begin + chunk, start + count)
            if count == n:  # the root: every row, so slices of x itself, no copy
                members = slice(begin, end)
                points = x[members]
            else:
                members = order[begin:end]
                points = torch.index_select(x, 0, members, out=buffer[: len(members)])
            labels, sq = nearest(points, squared_norms(points), centroids[node])
            next_node[members] = node * k + labels
            inertia += float(sq.sum())
    return centroids, next_node, inertia


@dataclass
class HierarchicalCodebook:
    """A fitted tree of centroids; `levels[l]` has shape (k**l, k, dim)."""

    k: int
    depth: int
    levels: list[torch.Tensor]
    inertia_per_level: list[float] = field(default_factory=list)
    """Mean squared distance of a sample feature to its node's centroid, after each level."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """encoder, sample_size, fit_seconds, seed, iterations, created_at, ..."""
    _centroid_bias: tuple[tuple[torch.Tensor, ...], list[torch.Tensor]] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    """(the level tensors it was computed from, their `centroid_bias`): cached for assignment."""

    @property
    def dim(self) -> int:
        return int(self.levels[0].shape[-1])

    @property
    def vocab_size(self) -> int:
        return self.k**self.depth

    @property
    def leaf_centroids(self) -> torch.Tensor:
        """Centroid of every word, (k**depth, dim), indexed by word id."""
        return self.levels[-1].reshape(self.vocab_size, self.dim)

    @property
    def version(self) -> str:
        """Content hash of k, depth and every level's centroids."""
        digest = hashlib.sha256(f"k={self.k};depth={self.depth};".encode())
        for level in self.levels:
            digest.update(level.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    @classmethod
    def fit(
        cls,
        features: np.ndarray | torch.Tensor,
        k: int,
        depth: int,
        seed: int = 0,
        iterations: int = 50,
        device: str | torch.device | None = None,
        encoder: str | None = None,
        max_points_per_centroid: int | None = None,
        init_trials: int | None = None,
    ) -> HierarchicalCodebook:
        """Fit the tree on a sample of features (N, dim); float16 input is computed in float32.

        `max_points_per_centroid`: train a node on at most this many points per centroid (a
        seeded random subsample, like faiss's default 256); every point is still labelled.
        None (the default) trains on every point: in benchmarks/bench_codebook.py, 256 fitted
        1.3-2.5x faster but left inertia 1.3-8.7% higher, up to 2.9% above faiss's on every
        point, outside the 2% we hold the fit to; it is there for samples too big otherwise.

        `init_trials`: k-means++ candidates tried per seed (default 2 + ln k, scikit-learn's
        greedy rule); 1 is classic k-means++: ~10% faster with 256 points per centroid, at up
        to 4% higher inertia (10-15% and up to 6% on every point; see BENCHMARKS.md).
        """
        started = time.perf_counter()
        device = torch.device(device) if device is not None else default_device()
        x = _as_float_tensor(features, device)
        n, dim = x.shape
        if n == 0:
            raise ValueError("cannot fit a codebook on zero features")
        if k < 2 or depth < 1:
            raise ValueError("k must be >= 2 and depth >= 1")
        if max_points_per_centroid is not None and max_points_per_centroid < 1:
            raise ValueError("max_points_per_centroid must be >= 1 (or None: every point)")
        if init_trials is not None and init_trials < 1:
            raise ValueError("init_trials must be >= 1 (or None: 2 + ln k)")
        node_of = torch.zeros(n, dtype=torch.long, device=device)  # node each point sits in
        levels: list[torch.Tensor] = []
        inertia_per_level: list[float] = []
        for level in range(depth):
            parents = levels[-1] if levels else None
            centroids, next_node, level_inertia = _fit_level(
                x, node_of, parents, level, k, seed, iterations, max_points_per_centroid, init_trials
            )
            levels.append(centroids)
            inertia_per_level.append(level_inertia / n)
            node_of = next_node
        metadata = {
            "encoder": encoder,
            "sample_size": int(n),
            "seed": seed,
            "iterations": iterations,
            "max_points_per_centroid": max_points_per_centroid,
            "init_trials": init_trials,
            "fit_seconds": round(time.perf_counter() - started, 3),
            "device": str(device),
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
        }
        cpu_levels = [level.cpu() for level in levels]
        return cls(
            k=k, depth=depth, levels=cpu_levels, inertia_per_level=inertia_per_level, metadata=metadata
        )

    def to(self, device: str | torch.device) -> HierarchicalCodebook:
        """A copy whose centroids live on `device` (assignment runs there)."""
        levels = [level.to(device) for level in self.levels]
        return HierarchicalCodebook(
            self.k, self.depth, levels, list(self.inertia_per_level), dict(self.metadata)
        )

    def centroid_bias(self) -> list[torch.Tensor]:
        """|c|^2 of every centroid, (k**l, k) per level, the constant of assignment's scores.

        A repeat of an earlier centroid of the same node (a node fitted on fewer than k
        points repeats them) gets +inf, so it never wins: otherwise identical centroids tie,
        and which one a matmul's rounding picks would depend on the path, i.e. on the batch.
        Computed once, then cached (for 20,736 leaves x 1024 dims recomputing it per call
        cost more than assigning a batch).
        """
        cached = self._centroid_bias
        if (
            cached is None
            or len(cached[0]) != len(self.levels)
            or any(a is not b for a, b in zip(cached[0], self.levels, strict=False))
        ):
            biases = []
            for level in self.levels:
                bias = (level * level).sum(-1)
                for later in range(1, self.k):
                    repeat = (level[:, later : later + 1] == level[:, :later]).all(-1).any(-1)
                    bias[:, later][repeat] = torch.inf
                biases.append(bias)
            cached = (tuple(self.levels), biases)
            self._centroid_bias = cached
        return cached[1]

    def assign_levels(self, features: np.ndarray | torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Per-level child index of every feature, (N, depth) int64, descending the tree.

        Each level visits the rows grouped by the node they reached, `batch_size` rows
        gathered and converted to float32 at a time (default: about CHUNK_BYTES of float32
        rows). Besides the input (copied once to the codebook's device if it lives elsewhere),
        memory is a few such chunks and O(N) indices.
        """
        device = self.levels[0].device
        x_all = _as_tensor(features)
        if x_all.ndim != 2 or x_all.shape[1] != self.dim:
            raise ValueError(f"features must have shape (N, {self.dim}), got {tuple(x_all.shape)}")
        # Every level visits every row: on an accelerator the batch is copied there once (in
        # its own dtype), not once per level.
        x_all = x_all.to(device)
        n = x_all.shape[0]
        chunk = batch_size or max(1024, CHUNK_BYTES // (4 * self.dim))
        centroid_bias = self.centroid_bias()
        with torch.inference_mode():
            out = torch.empty((n, self.depth), dtype=torch.long, device=device)
            # Reused gather buffers: a fresh chunk-sized tensor per gather costs more in page
            # faults than the copy itself.
            gathered = torch.empty((min(chunk, n), self.dim), dtype=x_all.dtype, device=device)
            converted = gathered
            if gathered.dtype != torch.float32:
                converted = torch.empty(gathered.shape, dtype=torch.float32, device=device)
            # Level 0 takes rows in input order (all are under the root); each later level
            # takes them grouped by node, across all n rows rather than per chunk, so a deep
            # level's node keeps all its rows in one slice.
            order, node, sorted_node = None, torch.zeros(n, dtype=torch.long, device=device), None
            for level in range(self.depth):
                for begin in range(0, n, chunk):
                    if order is None:
                        rows, x = slice(begin, begin + chunk), x_all[begin : begin + chunk]
                        parents = node[rows]
                    else:
                        rows, parents = order[begin : begin + chunk], sorted_node[begin : begin + chunk]
                        x = torch.index_select(x_all, 0, rows, out=gathered[: len(rows)])
                    if x.dtype != torch.float32:
                        x = converted[: len(x)].copy_(x)
                    out[rows, level] = _descend(x, parents, self.levels[level], centroid_bias[level])
                node = node * self.k + out[:, level]
                if level + 1 < self.depth:
                    sorted_node, order = torch.sort(node, stable=True)
        return out.cpu().numpy()

    def assign(self, features: np.ndarray | torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Visual word id of every feature, (N,) int32."""
        per_level = self.assign_levels(features, batch_size)
        weights = self.k ** np.arange(self.depth - 1, -1, -1, dtype=np.int64)
        return (per_level @ weights).astype(np.int32)

    def metadata_json(self) -> dict[str, Any]:
        return {
            **self.metadata,
            "version": self.version,
            "k": self.k,
            "depth": self.depth,
            "dim": self.dim,
            "vocab_size": self.vocab_size,
            "inertia_per_level": self.inertia_per_level,
        }

    def save(self, uri: str, s3: S3Config | None = None) -> str:
        """Write centroids + metadata into the directory `uri`; returns `uri`."""
        tensors = {f"level_{i}": level.detach().cpu().contiguous() for i, level in enumerate(self.levels)}
        storage.write_bytes(storage.join(uri, CENTROIDS_FILE), save_safetensors(tensors), s3)
        # Metadata last: a directory with codebook.json is a complete codebook.
        payload = json.dumps(self.metadata_json(), indent=2, sort_keys=True).encode()
        storage.write_bytes(storage.join(uri, METADATA_FILE), payload, s3)
        return uri

    def save_to_output(self, output: str, s3: S3Config | None = None) -> str:
        """Write under `<output>/codebook/<version>/`; returns that directory."""
        return self.save(Layout(output).codebook(self.version), s3)

    @classmethod
    def load(cls, uri: str, s3: S3Config | None = None) -> HierarchicalCodebook:
        """Load a codebook directory and check its content against its version."""
        meta = json.loads(storage.read_bytes(storage.join(uri, METADATA_FILE), s3))
        tensors = load_safetensors(storage.read_bytes(storage.join(uri, CENTROIDS_FILE), s3))
        levels = [tensors[f"level_{i}"] for i in range(meta["depth"])]
        known = {"version", "k", "depth", "dim", "vocab_size", "inertia_per_level"}
        codebook = cls(
            k=meta["k"],
            depth=meta["depth"],
            levels=levels,
            inertia_per_level=list(meta["inertia_per_level"]),
            metadata={key: value for key, value in meta.items() if key not in known},
        )
        if codebook.version != meta["version"]:
            raise ValueError(f"{uri}: centroids do not match version {meta['version']} (corrupt codebook)")
        return codebook


def fitted_encoders(meta: dict[str, Any]) -> list[str]:
    """The encoder ids a codebook was fit on (its codebook.json `encoder`); [] when unrecorded."""
    return [e for e in (meta.get("encoder") or "").split(",") if e]


def list_codebooks(output: str, s3: S3Config | None = None) -> list[dict[str, Any]]:
    """Metadata of every complete codebook under `<output>/codebook/`, with its `uri`."""
    return versions.list_versions(Layout(output).codebooks, METADATA_FILE, s3)


def latest_codebook(
    output: str, s3: S3Config | None = None, k: int | None = None, depth: int | None = None
) -> str | None:
    """URI of the newest codebook (optionally with this k and depth), or None."""
    meta = versions.newest(list_codebooks(output, s3), k=k, depth=depth)
    return meta["uri"] if meta is not None else None


# ---- sampling the fit (pipelines/fit_codebook.py) --------------------------------------------

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


def encoders_of(manifest: pa.Table) -> str | None:
    """The encoders of a manifest's rows, comma-joined: what a codebook is fitted on."""
    encoders = sorted({e for e in manifest.column("encoder").to_pylist() if e})
    if len(encoders) > 1:
        log.warning("features come from several encoders %s; fitting on all of them", encoders)
    return ",".join(encoders) or None


def sample_threshold(total_clips: int, wanted: int) -> float:
    """Keep clips whose sample score is below this: a little more than the expected share of
    `wanted` out of `total_clips`, so the final cut (`cut_sample`) rarely comes up short."""
    return 1.0 if total_clips <= wanted else min(1.0, (wanted + 4 * math.sqrt(wanted) + 16) / total_clips)


def scored_clips(batch: pa.Table, seed: int, keep_below: float) -> pa.Table:
    """The clips of a batch of feature rows whose seeded score is below `keep_below`, with it."""
    scores = sample_scores(batch.column("video_id").to_pylist(), batch.column("clip_index").to_numpy(), seed)
    batch = batch.append_column("score", pa.array(scores))
    return batch.filter(pc.less(batch.column("score"), keep_below))


def cut_sample(scored: list[pa.Table], wanted: int) -> pa.Table:
    """The `wanted` lowest-scoring clips: the same sample whatever order the batches came in."""
    sample = pa.concat_tables(scored)
    order = pc.sort_indices(
        sample, [("score", "ascending"), ("video_id", "ascending"), ("clip_index", "ascending")]
    )
    return sample.take(order[:wanted])


def fit_settings(codebook: CodebookConfig, encoder: str | None) -> dict[str, Any]:
    """`HierarchicalCodebook.fit` keyword arguments from the config's codebook section."""
    return {
        "k": codebook.k,
        "depth": codebook.depth,
        "seed": codebook.seed,
        "iterations": codebook.iterations,
        "encoder": encoder,
        "max_points_per_centroid": codebook.max_points_per_centroid,
        "init_trials": codebook.init_trials,
    }
