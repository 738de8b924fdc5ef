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

Fitting is plain torch (GPU when there is one): k-means++ initialisation from a seeded
generator per node, Lloyd iterations with early stop, empty clusters re-seeded from the
points farthest from their centroid. A node with fewer points than k keeps its points as
centroids (padded by repetition); a node with no points copies its parent's centroid, so
every word id stays reachable and assignment never fails.

Saved as `centroids.safetensors` (one tensor per level) + `codebook.json` (metadata). The
version is a content hash of k, depth and the centroids, so refitting the same sample with
the same seed gives the same version.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from videobert import storage
from videobert.config import S3Config
from videobert.tables import Layout

CENTROIDS_FILE = "centroids.safetensors"
METADATA_FILE = "codebook.json"
GALLERY_FILE = "gallery.png"
INIT_SAMPLE = 8192  # points k-means++ seeds from, per node
# Assignment tuning, measured on a 2-core EPYC (32 MB L3): rows are descended in chunks of
# about CHUNK_BYTES of float32. Smaller chunks stay in cache (depth 2 gained ~20% at 16 MB)
# but leave fewer rows per node at deep levels (depth 4 lost ~10%); 32 MB is the middle.
# Nodes with fewer rows than SMALL_GROUP share batched matmuls of about BMM_ELEMENTS floats.
CHUNK_BYTES = 32 << 20
SMALL_GROUP = 32
BMM_ELEMENTS = 1 << 22


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_float_tensor(features: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(features, np.ndarray) and not features.flags.writeable:
        features = features.copy()  # torch warns on read-only arrays (e.g. from Arrow)
    tensor = torch.as_tensor(features) if isinstance(features, np.ndarray) else features
    if tensor.ndim != 2:
        raise ValueError(f"features must be 2-d (N, dim), got shape {tuple(tensor.shape)}")
    return tensor.to(device=device, dtype=torch.float32)


def _distances(x: torch.Tensor, centroids: torch.Tensor, centroid_sq: torch.Tensor) -> torch.Tensor:
    """Squared distance up to the per-row constant |x|^2: |c|^2 - 2 x.c, shape (n, k).

    Fit and assignment both take argmin of this expression (assignment's batched path for
    small nodes evaluates the same one with baddbmm).
    """
    return torch.addmm(centroid_sq[None, :], x, centroids.T, alpha=-2.0)


def _nearest(
    x: torch.Tensor, x_sq: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid and the true squared distance to it."""
    best, labels = _distances(x, centroids, (centroids * centroids).sum(1)).min(1)
    return labels, (best + x_sq).clamp_min_(0.0)


def _descend(
    x: torch.Tensor,
    node: torch.Tensor,
    centroids: torch.Tensor,
    centroid_sq: torch.Tensor,
    buffer: torch.Tensor,
) -> torch.Tensor:
    """Child index (n,) of each row of x (n, dim) under the node (n,) it reached.

    `centroids` (nodes, k, dim) and `centroid_sq` (nodes, k) are one level's; `buffer`
    (>= n, dim) is scratch space reused across calls (a fresh large tensor per level costs
    more in page faults than the copy itself).
    """
    if centroids.shape[0] == 1:  # the root: one matmul, no grouping
        return _distances(x, centroids[0], centroid_sq[0]).argmin(1)
    k, dim = centroids.shape[1], centroids.shape[2]
    order = torch.argsort(node, stable=True)
    nodes, counts = torch.unique_consecutive(node[order], return_counts=True)
    local = torch.empty_like(node)
    big = counts >= SMALL_GROUP
    big_rows = torch.repeat_interleave(big, counts)  # per sorted row: is it in a big group?
    if bool(big.any()):
        # Big nodes: their rows copied contiguously once, then one addmm per node.
        rows_of_big = order[big_rows]
        x_big = torch.index_select(x, 0, rows_of_big, out=buffer[: len(rows_of_big)])
        start = 0
        for parent, count in zip(nodes[big].tolist(), counts[big].tolist(), strict=True):
            part = slice(start, start + count)
            nearest = _distances(x_big[part], centroids[parent], centroid_sq[parent]).argmin(1)
            local[rows_of_big[part]] = nearest
            start += count
    if not bool(big.all()):
        # Small nodes: groups padded to the next power of two, one baddbmm per size (and per
        # BMM_ELEMENTS), gathering rows straight from x. Padding repeats a group's last row.
        rows_of_small = order[~big_rows]
        s_nodes, s_counts = nodes[~big], counts[~big]
        s_starts = torch.cumsum(s_counts, 0) - s_counts
        padded = 1 << torch.ceil(torch.log2(s_counts.to(torch.float64))).to(torch.long)
        for size in torch.unique(padded).tolist():
            groups = torch.nonzero(padded == size).flatten()
            offsets = torch.arange(size, device=x.device)
            per_call = max(1, BMM_ELEMENTS // ((size + k) * dim))
            for begin in range(0, len(groups), per_call):
                g = groups[begin : begin + per_call]
                g_nodes, g_counts = s_nodes[g], s_counts[g]
                slots = s_starts[g][:, None] + torch.minimum(offsets[None, :], g_counts[:, None] - 1)
                rows = rows_of_small[slots]  # (groups, size) row indices into x
                distances = torch.baddbmm(  # (groups, size, k)
                    centroid_sq[g_nodes][:, None, :], x[rows], centroids[g_nodes].transpose(1, 2), alpha=-2.0
                )
                valid = offsets[None, :] < g_counts[:, None]
                local[rows[valid]] = distances.argmin(-1)[valid]
    return local


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (as scikit-learn): of 2 + log(k) D^2-sampled candidates, keep the best.

    Seeds from a random subsample of at most INIT_SAMPLE points: initialisation then costs
    a few Lloyd iterations' worth instead of 4k passes over a large node.
    """
    if x.shape[0] > INIT_SAMPLE:
        x = x[torch.randperm(x.shape[0], generator=generator, device=x.device)[:INIT_SAMPLE]]
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    x_sq = (x * x).sum(1)
    first = int(torch.randint(n, (1,), generator=generator, device=x.device).item())
    centroids = [x[first]]
    closest = (x_sq - 2 * (x @ x[first]) + x_sq[first]).clamp_min_(0.0)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # every point sits on a centroid already: duplicates are harmless
            candidates = torch.randint(n, (trials,), generator=generator, device=x.device)
        else:
            candidates = torch.multinomial(closest / total, trials, replacement=True, generator=generator)
        distance = (x_sq[None, :] - 2 * (x[candidates] @ x.T) + x_sq[candidates][:, None]).clamp_min_(0.0)
        potential = torch.minimum(closest[None, :], distance)  # (trials, n)
        best = int(potential.sum(1).argmin())
        centroids.append(x[candidates[best]])
        closest = potential[best]
    return torch.stack(centroids)


def kmeans(
    x: torch.Tensor, k: int, generator: torch.Generator, iterations: int, tolerance: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Flat k-means on one node's points: (centroids (k, dim), labels (n,), inertia sum).

    Stops early when the inertia improves by less than `tolerance` (relative).
    """
    n = x.shape[0]
    if n <= k:  # too few points: each point is its own centroid; pad by repetition
        centroids = x[torch.arange(k, device=x.device) % n].clone()
        labels = torch.arange(n, device=x.device)
        return centroids, labels, 0.0
    centroids = _kmeans_plus_plus(x, k, generator)
    x_sq = (x * x).sum(1)
    labels, sq = _nearest(x, x_sq, centroids)
    inertia = float(sq.sum())
    for _ in range(iterations):
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        # One-hot matmul: no float atomics (deterministic on GPU), and on CPU ~3x faster than
        # index_add_, which took half the fit time.
        sums = torch.nn.functional.one_hot(labels, k).to(x.dtype).T @ x
        centroids = sums / counts.clamp_min(1.0)[:, None]
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            # Re-seed each empty cluster with one of the points farthest from its centroid.
            farthest = torch.argsort(sq, descending=True, stable=True)[: len(empty)]
            centroids[empty] = x[farthest]
        labels, sq = _nearest(x, x_sq, centroids)
        new_inertia = float(sq.sum())
        improved = inertia - new_inertia
        inertia = new_inertia
        if len(empty) == 0 and improved <= tolerance * max(inertia, 1e-12):
            break
    return centroids, labels, inertia


def _node_seed(seed: int, level: int, node: int) -> int:
    digest = hashlib.sha256(f"{seed}:{level}:{node}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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
    _centroid_sq: tuple[tuple[torch.Tensor, ...], list[torch.Tensor]] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    """(the level tensors it was computed from, their squared norms): cached for assignment."""

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
    ) -> HierarchicalCodebook:
        """Fit the tree on a sample of features (N, dim); float16 input is computed in float32."""
        started = time.perf_counter()
        device = torch.device(device) if device is not None else default_device()
        x = _as_float_tensor(features, device)
        n, dim = x.shape
        if n == 0:
            raise ValueError("cannot fit a codebook on zero features")
        if k < 2 or depth < 1:
            raise ValueError("k must be >= 2 and depth >= 1")
        node_of = torch.zeros(n, dtype=torch.long, device=device)  # node each point sits in
        levels: list[torch.Tensor] = []
        inertia_per_level: list[float] = []
        for level in range(depth):
            centroids = torch.empty(k**level, k, dim, device=device)
            next_node = torch.empty_like(node_of)
            order = torch.argsort(node_of, stable=True)
            nodes, counts = torch.unique_consecutive(node_of[order], return_counts=True)
            members_of = dict(zip(nodes.tolist(), torch.split(order, counts.tolist()), strict=True))
            level_inertia = 0.0
            for node in range(k**level):
                members = members_of.get(node)
                if members is None:  # no sample point reached this node: copy the parent
                    parent = levels[level - 1][node // k, node % k]
                    centroids[node] = parent.expand(k, dim)
                    continue
                generator = torch.Generator(device=device).manual_seed(_node_seed(seed, level, node))
                node_centroids, labels, inertia = kmeans(x[members], k, generator, iterations)
                centroids[node] = node_centroids
                next_node[members] = node * k + labels
                level_inertia += inertia
            levels.append(centroids)
            inertia_per_level.append(level_inertia / n)
            node_of = next_node
        metadata = {
            "encoder": encoder,
            "sample_size": int(n),
            "seed": seed,
            "iterations": iterations,
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

    def centroid_sq(self) -> list[torch.Tensor]:
        """Squared norm of every centroid, (k**l, k) per level; computed once, then cached."""
        cached = self._centroid_sq
        if (
            cached is None
            or len(cached[0]) != len(self.levels)
            or any(a is not b for a, b in zip(cached[0], self.levels, strict=False))
        ):
            # 20,736 leaves x 1024 dims: recomputing this per call cost more than assigning a batch.
            cached = (tuple(self.levels), [(level * level).sum(-1) for level in self.levels])
            self._centroid_sq = cached
        return cached[1]

    def assign_levels(self, features: np.ndarray | torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Per-level child index of every feature, (N, depth) int64, descending the tree.

        `batch_size` rows are converted to float32 and descended at a time (default: about
        CHUNK_BYTES of float32 rows); memory stays bounded by a few such chunks.
        """
        device = self.levels[0].device
        if isinstance(features, np.ndarray) and not features.flags.writeable:
            features = features.copy()  # torch warns on read-only arrays (e.g. from Arrow)
        x_all = torch.as_tensor(features) if isinstance(features, np.ndarray) else features
        if x_all.ndim != 2 or x_all.shape[1] != self.dim:
            raise ValueError(f"features must have shape (N, {self.dim}), got {tuple(x_all.shape)}")
        n = x_all.shape[0]
        chunk = batch_size or max(1024, CHUNK_BYTES // (4 * self.dim))
        centroid_sq = self.centroid_sq()
        with torch.inference_mode():
            out = torch.empty((n, self.depth), dtype=torch.long, device=device)
            buffer = torch.empty((min(chunk, n), self.dim), dtype=torch.float32, device=device)
            for begin in range(0, n, chunk):
                x = x_all[begin : begin + chunk].to(device=device, dtype=torch.float32)
                node = torch.zeros(x.shape[0], dtype=torch.long, device=device)
                for level in range(self.depth):
                    local = _descend(x, node, self.levels[level], centroid_sq[level], buffer)
                    out[begin : begin + x.shape[0], level] = local
                    node = node * self.k + local
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


def list_codebooks(output: str, s3: S3Config | None = None) -> list[dict[str, Any]]:
    """Metadata of every complete codebook under `<output>/codebook/`, with its `uri`."""
    found = []
    for meta_uri in storage.list_files(Layout(output).codebooks, s3, suffix="/" + METADATA_FILE):
        meta = json.loads(storage.read_bytes(meta_uri, s3))
        meta["uri"] = meta_uri[: -len(METADATA_FILE) - 1]
        found.append(meta)
    return found


def latest_codebook(
    output: str, s3: S3Config | None = None, k: int | None = None, depth: int | None = None
) -> str | None:
    """URI of the newest codebook (optionally with this k and depth), or None."""
    matches = [
        meta
        for meta in list_codebooks(output, s3)
        if (k is None or meta["k"] == k) and (depth is None or meta["depth"] == depth)
    ]
    if not matches:
        return None
    return max(matches, key=lambda meta: (meta.get("created_at", ""), meta["version"]))["uri"]
