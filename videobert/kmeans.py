"""Flat k-means kernels in plain torch (GPU when there is one), for one node or a batch of nodes.

`kmeans` fits one node's points: greedy k-means++ initialisation (scikit-learn's rule, from a
random subsample of a big node), then Lloyd iterations with early stop, empty clusters
re-seeded from the points farthest from their centroid. `kmeans_batched` fits B small nodes
at once as padded (B, rows, dim) tensors, a few batched matmuls per step instead of a Python
loop per node, taking the same steps `kmeans` would take on each from the same seeds.

Distances are |c|^2 - 2 c.x (`distance_scores`), plus |x|^2 only where the true squared
distance is needed (`nearest`). `videobert.codebook` builds the hierarchical tree from these.
"""

from __future__ import annotations

import math

import torch

# Tuning measured on a 2-core EPYC (32 MB L3). k-means++ seeds a big node from a random
# INIT_SAMPLE of its points; each of its k - 1 steps is a pass over the sample. Over 3 seeds,
# final inertia moved < 0.3% between 512 and 8192 points; 1024 made level 1 5-10% faster than
# 2048 but depth 2 0.4% worse, so 2048.
INIT_SAMPLE = 2048
# k-means++ on nodes of at most GRAM_ROWS points (and no more than dim) reads its dot products
# from one Gram matrix per node: 2x faster seeding at ~58 rows (depth 4's last level), no
# gain at 200+ rows.
GRAM_ROWS = 128


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm along the last axis (no x*x temporary: 10x faster on 100k x 1024)."""
    return torch.linalg.vector_norm(x, dim=-1).square()


def distance_scores(x: torch.Tensor, centroids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Squared distance up to the per-row constant |x|^2: bias - 2 c.x, shape (k, n).

    `bias` is |c|^2 (+inf rules a centroid out, see `codebook.HierarchicalCodebook.centroid_bias`).
    Fit and the codebook's assignment both take the minimum of this over k. The (k, n) =
    centroids @ x.T layout is 15-30% faster on CPU than (n, k) for k ~ 12 (assignment's batched
    path for small nodes evaluates the same expression with baddbmm). Take `.min(0).indices`, not
    `.argmin(0)`: on CPU argmin across the strided k axis is 4x slower.
    """
    return torch.addmm(bias[:, None], centroids, x.T, alpha=-2.0)


def nearest(
    x: torch.Tensor, x_sq: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid and the true squared distance to it."""
    best, labels = distance_scores(x, centroids, squared_norms(centroids)).min(0)
    return labels, (best + x_sq).clamp_min_(0.0)


def _kmeans_plus_plus(
    x: torch.Tensor, k: int, generator: torch.Generator, trials: int | None = None
) -> torch.Tensor:
    """Greedy k-means++ (as scikit-learn) on one node: `_kmeans_plus_plus_batched` with B = 1.

    Seeds from a random subsample of at most INIT_SAMPLE points: initialisation then costs
    a few Lloyd iterations' worth instead of 4k passes over a large node.
    """
    if x.shape[0] > INIT_SAMPLE:
        sample = torch.randperm(x.shape[0], generator=generator, device=x.device)[:INIT_SAMPLE]
        x = x.index_select(0, torch.sort(sample).values)  # ascending: the gather streams
    counts = torch.tensor([x.shape[0]], device=x.device)
    return x[_kmeans_plus_plus_batched(x[None], squared_norms(x)[None], counts, k, generator, trials)[0]]


def kmeans(
    x: torch.Tensor,
    k: int,
    generator: torch.Generator,
    iterations: int,
    tolerance: float = 1e-4,
    init_trials: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Flat k-means on one node's points: (centroids (k, dim), labels (n,), inertia sum).

    Stops early when the inertia improves by less than `tolerance` (relative). `init_trials`:
    see `_kmeans_plus_plus_batched`.
    """
    n = x.shape[0]
    if n <= k:  # too few points: each point is its own centroid; pad by repetition
        centroids = x[torch.arange(k, device=x.device) % n].clone()
        labels = torch.arange(n, device=x.device)
        return centroids, labels, 0.0
    centroids = _kmeans_plus_plus(x, k, generator, init_trials)
    x_sq = squared_norms(x)
    labels, sq = nearest(x, x_sq, centroids)
    inertia = float(sq.sum())
    one_hot = torch.nn.functional.one_hot
    sums = counts = None
    for _ in range(iterations):
        if sums is None:
            counts = torch.bincount(labels, minlength=k).to(x.dtype)
            # One-hot matmul: no float atomics (deterministic on GPU), and on CPU ~3x faster
            # than index_add_, which took half the fit time.
            sums = one_hot(labels, k).to(x.dtype).T @ x
        centroids = sums / counts.clamp_min(1.0)[:, None]
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            # Re-seed each empty cluster with one of the points farthest from its centroid.
            farthest = torch.argsort(sq, descending=True, stable=True)[: len(empty)]
            centroids[empty] = x[farthest]
        new_labels, sq = nearest(x, x_sq, centroids)
        # Cluster sums move only by the rows that changed cluster: after the first few
        # iterations few do, and this skips most of a full pass over x (~30% of the fit).
        moved = torch.nonzero(new_labels != labels).flatten()
        if len(moved) > n // 4:
            sums = None
        elif len(moved):
            delta = (one_hot(new_labels[moved], k) - one_hot(labels[moved], k)).to(x.dtype)
            sums = sums + delta.T @ x[moved]
            counts = counts + delta.sum(0)
        labels = new_labels
        new_inertia = float(sq.sum())
        improved = inertia - new_inertia
        inertia = new_inertia
        if len(empty) == 0 and improved <= tolerance * max(inertia, 1e-12):
            break
    return centroids, labels, inertia


def _pick(points: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """points[b, index[b, j]] for (B, P, dim) points and (B, J) index: (B, J, dim).

    A flat index_select: several times faster on CPU than the advanced-indexing gather.
    """
    nodes, size, dim = points.shape
    offsets = torch.arange(nodes, device=points.device)[:, None] * size
    return points.reshape(-1, dim).index_select(0, (index + offsets).flatten()).view(*index.shape, dim)


def _kmeans_plus_plus_batched(
    points: torch.Tensor,
    x_sq: torch.Tensor,
    counts: torch.Tensor,
    k: int,
    generator: torch.Generator,
    trials: int | None = None,
) -> torch.Tensor:
    """Greedy k-means++ for B nodes at once: points (B, P, dim) -> (B, k) indices along P.

    The rule of scikit-learn's k-means++: of `trials` (default 2 + log(k)) D^2-sampled
    candidates, keep the one that lowers the potential most; 1 trial is classic k-means++.
    Node b's first counts[b] (> 0) rows are real; D^2 sampling is an inverse-CDF lookup in
    which padding weighs 0, so it is never drawn.
    """
    nodes, size = points.shape[0], points.shape[1]
    device = points.device
    trials = trials or 2 + int(math.log(k))
    valid = (torch.arange(size, device=device)[None, :] < counts[:, None]).to(points.dtype)
    last = counts[:, None] - 1
    first = torch.minimum(
        (torch.rand(nodes, 1, generator=generator, device=device) * counts[:, None]).long(), last
    )
    chosen = [first]
    # Dot products of every point with chosen ones: (B, P, J). For small nodes, one Gram
    # matrix up front is cheaper than k - 1 skinny matmuls that each stream every point
    # (only while it is no bigger than the points themselves, P <= dim).
    use_gram = size <= min(GRAM_ROWS, points.shape[2])
    gram = torch.bmm(points, points.transpose(1, 2)) if use_gram else None

    def dots_with(index: torch.Tensor) -> torch.Tensor:
        if gram is not None:
            return torch.gather(gram, 2, index[:, None, :].expand(-1, size, -1))
        # (B, P, J) rather than (B, J, P): this bmm is ~2x faster with the short side last.
        return torch.bmm(points, _pick(points, index).transpose(1, 2))

    # torch.gather rather than advanced indexing throughout: far less per-call overhead.
    dots = dots_with(first)[:, :, 0]  # (B, P)
    closest = (x_sq - 2 * dots + torch.gather(x_sq, 1, first)).clamp_min_(0.0) * valid
    for _ in range(1, k):
        # All-zero weights (every point on a centroid) draw the last point: a harmless duplicate.
        cdf = torch.cumsum(closest, 1)
        draws = torch.rand(nodes, trials, generator=generator, device=device) * cdf[:, -1:]
        candidates = torch.minimum(torch.searchsorted(cdf, draws, right=True), last)  # (B, T)
        distance = (
            (x_sq[:, :, None] + torch.gather(x_sq, 1, candidates)[:, None, :])
            .sub_(dots_with(candidates), alpha=2.0)
            .clamp_min_(0.0)
        )
        potential = torch.minimum(closest[:, :, None], distance)  # padding stays 0, as `closest`
        best = potential.sum(1).argmin(1, keepdim=True)  # (B, 1)
        chosen.append(torch.gather(candidates, 1, best))
        closest = torch.gather(potential, 2, best[:, None, :].expand(-1, size, 1))[:, :, 0]
    return torch.cat(chosen, 1)


def _nearest_batched(
    points: torch.Tensor, x_sq: torch.Tensor, centroids: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`nearest` for B nodes: labels (B, P) and squared distances (B, P), 0 on padding."""
    distances = torch.baddbmm(  # (B, k, P): faster than (B, P, k), as in `nearest`
        squared_norms(centroids)[:, :, None], centroids, points.transpose(1, 2), alpha=-2.0
    )
    best, labels = distances.min(1)
    return labels, (best + x_sq).clamp_min_(0.0) * valid


def kmeans_batched(
    x: torch.Tensor,
    rows: torch.Tensor,
    counts: torch.Tensor,
    k: int,
    generator: torch.Generator,
    iterations: int,
    tolerance: float = 1e-4,
    init_trials: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`kmeans` on B nodes at once: rows (B, P) indices into x, the first counts[b] (> k) real.

    Padding slots may hold any valid row index; they are masked out of every sum. Returns
    (centroids (B, k, dim), labels (B, P), inertia (B,)). Each node stops by the same rule as
    `kmeans`; stopped nodes leave the batch, so late iterations run on the few left.
    """
    nodes, size = rows.shape
    device = x.device
    points = x.index_select(0, rows.flatten()).view(nodes, size, -1)  # 4x faster than x[rows]
    x_sq = squared_norms(points)
    valid = torch.arange(size, device=device)[None, :] < counts[:, None]
    centroids = _pick(points, _kmeans_plus_plus_batched(points, x_sq, counts, k, generator, init_trials))
    clusters = torch.arange(k, device=device)[None, :, None]
    labels, sq = _nearest_batched(points, x_sq, centroids, valid)
    inertia = sq.sum(1)
    out_centroids, out_labels, out_inertia = centroids.clone(), labels.clone(), inertia.clone()
    ids = torch.arange(nodes, device=device)  # the output slot of each node still in the batch
    for step in range(iterations):
        # One-hot (B, k, P) bmm for the sums, as `kmeans` (no float atomics).
        one_hot = ((labels[:, None, :] == clusters) & valid[:, None, :]).to(x.dtype)
        sizes = one_hot.sum(2)  # (B, k)
        centroids = torch.bmm(one_hot, points) / sizes.clamp_min(1.0)[:, :, None]
        empty = sizes == 0
        has_empty = empty.any(1)
        if bool(has_empty.any()):
            # As `kmeans`: a node's i-th empty cluster takes its i-th farthest point.
            farthest = torch.argsort(torch.where(valid, sq, -1.0), dim=1, descending=True, stable=True)
            rank = (torch.cumsum(empty, 1) - 1).clamp_min_(0)
            refill = _pick(points, torch.gather(farthest, 1, rank))
            centroids = torch.where(empty[:, :, None], refill, centroids)
        labels, sq = _nearest_batched(points, x_sq, centroids, valid)
        new_inertia = sq.sum(1)
        improved = inertia - new_inertia
        inertia = new_inertia
        done = ~has_empty & (improved <= tolerance * inertia.clamp_min(1e-12))
        if step == iterations - 1:
            done = torch.ones_like(done)
        if bool(done.any()):
            out_centroids[ids[done]] = centroids[done]
            out_labels[ids[done]] = labels[done]
            out_inertia[ids[done]] = inertia[done]
            keep = ~done
            if not bool(keep.any()):
                break
            ids, points, x_sq, valid = ids[keep], points[keep], x_sq[keep], valid[keep]
            labels, sq, inertia = labels[keep], sq[keep], inertia[keep]
    return out_centroids, out_labels, out_inertia
