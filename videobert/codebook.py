"""Hierarchical k-means visual-word codebook (VideoBERT: depth 4, k 12 -> 20,736 words).

Level 0 clusters every feature into k groups; each group is clustered again into k, and so
on for `depth` levels. Level `l` holds k**l nodes with k child centroids each, stored as a
tensor of shape (k**l, k, dim). A feature descends the tree, compared with only k centroids
per level, and its word id is the leaf index:

    word = sum(index_at_level[l] * k ** (depth - 1 - l))

so `word // k ** (depth - 1 - l)` is the node it reached after level l (its prefix).

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

    Fit and assignment both take argmin of exactly this, so they agree on ties.
    """
    return torch.addmm(centroid_sq[None, :], x, centroids.T, alpha=-2.0)


def _nearest(
    x: torch.Tensor, x_sq: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid and the true squared distance to it."""
    best, labels = _distances(x, centroids, (centroids * centroids).sum(1)).min(1)
    return labels, (best + x_sq).clamp_min_(0.0)


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
        if x.is_cuda:  # one-hot matmul: no float atomics, so the fit stays deterministic on GPU
            sums = torch.nn.functional.one_hot(labels, k).to(x.dtype).T @ x
        else:
            sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
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

    def assign_levels(self, features: np.ndarray | torch.Tensor, batch_size: int = 262_144) -> np.ndarray:
        """Per-level child index of every feature, (N, depth) int64, descending the tree."""
        device = self.levels[0].device
        if isinstance(features, np.ndarray) and not features.flags.writeable:
            features = features.copy()  # torch warns on read-only arrays (e.g. from Arrow)
        x_all = torch.as_tensor(features) if isinstance(features, np.ndarray) else features
        if x_all.ndim != 2 or x_all.shape[1] != self.dim:
            raise ValueError(f"features must have shape (N, {self.dim}), got {tuple(x_all.shape)}")
        centroid_sq = [(level * level).sum(-1) for level in self.levels]  # (k**l, k)
        out = np.empty((x_all.shape[0], self.depth), dtype=np.int64)
        with torch.no_grad():
            for begin in range(0, x_all.shape[0], batch_size):
                x = x_all[begin : begin + batch_size].to(device=device, dtype=torch.float32)
                node = torch.zeros(x.shape[0], dtype=torch.long, device=device)
                for level in range(self.depth):
                    # Group rows by the node they reached: k comparisons per row, one matmul per node.
                    order = torch.argsort(node, stable=True)
                    nodes, counts = torch.unique_consecutive(node[order], return_counts=True)
                    x_sorted = x[order]
                    local_sorted = torch.empty_like(order)
                    start = 0
                    for parent, count in zip(nodes.tolist(), counts.tolist(), strict=True):
                        rows = slice(start, start + count)
                        partial = _distances(
                            x_sorted[rows], self.levels[level][parent], centroid_sq[level][parent]
                        )
                        local_sorted[rows] = partial.argmin(1)
                        start += count
                    local = torch.empty_like(order)
                    local[order] = local_sorted
                    out[begin : begin + x.shape[0], level] = local.cpu().numpy()
                    node = node * self.k + local
        return out

    def assign(self, features: np.ndarray | torch.Tensor, batch_size: int = 262_144) -> np.ndarray:
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
