"""Hierarchical k-means: planted clusters, prefix consistency, determinism, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from videobert import codebook as codebook_module
from videobert import kmeans as kmeans_module
from videobert.codebook import HierarchicalCodebook, latest_codebook
from videobert.kmeans import kmeans, kmeans_batched


def planted(k: int, depth: int, per_leaf: int = 40, dim: int = 16, seed: int = 0):
    """Gaussians planted as a tree: each level's spread is 20x smaller than its parent's."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((1, dim))
    scale = 1000.0
    for _ in range(depth):
        children = centres[:, None, :] + rng.normal(size=(len(centres), k, dim)) * scale
        centres = children.reshape(-1, dim)
        scale /= 20
    labels = np.repeat(np.arange(len(centres)), per_leaf)
    points = centres[labels] + rng.normal(size=(len(labels), dim)) * scale
    order = rng.permutation(len(labels))
    return points[order].astype(np.float32), labels[order]


def test_flat_kmeans_recovers_planted_clusters():
    x, labels = planted(k=8, depth=1)
    codebook = HierarchicalCodebook.fit(x, k=8, depth=1, seed=0, iterations=50)
    assert adjusted_rand_score(labels, codebook.assign(x)) > 0.99


def test_hierarchy_recovers_planted_tree_and_prefixes_match_each_level():
    k, depth = 3, 3
    x, labels = planted(k=k, depth=depth, per_leaf=20)
    codebook = HierarchicalCodebook.fit(x, k=k, depth=depth, seed=1, iterations=50)
    words = codebook.assign(x)
    assert words.dtype == np.int32 and words.min() >= 0 and words.max() < k**depth
    assert adjusted_rand_score(labels, words) > 0.99
    # Prefix at each level == that level's own nearest centroid, checked by brute force in numpy.
    levels = [level.numpy() for level in codebook.levels]
    for i in range(0, len(x), 37):
        node = 0
        for level in range(depth):
            children = levels[level][node]
            own = int(np.argmin(((children - x[i]) ** 2).sum(1)))
            node = node * k + own
            assert words[i] // k ** (depth - 1 - level) == node
        assert node == words[i]


@pytest.mark.parametrize("small_node_elements", [1, codebook_module.SMALL_NODE_ELEMENTS, 1 << 30])
def test_assignment_matches_brute_force_descent_in_any_chunking(small_node_elements, monkeypatch):
    # Skewed data: a few nodes get hundreds of rows, most a handful. Every node takes one
    # matmul (1), or only the batched small-node path (1 << 30), or a mix (the default); batch
    # sizes that split nodes across chunks must not change a word, nor float16 input.
    monkeypatch.setattr(codebook_module, "SMALL_NODE_ELEMENTS", small_node_elements)
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(size=(1200, 8)), rng.normal(size=(100, 8)) * 5 + 20]).astype(np.float32)
    k, depth = 5, 3
    codebook = HierarchicalCodebook.fit(x, k=k, depth=depth, seed=0, iterations=5)
    levels = [level.numpy().astype(np.float64) for level in codebook.levels]

    def brute_force(features: np.ndarray) -> np.ndarray:
        node = np.zeros(len(features), np.int64)
        for level in levels:
            children = level[node]  # (n, k, dim): each row's own k candidates
            node = node * k + ((children - features[:, None, :].astype(np.float64)) ** 2).sum(-1).argmin(1)
        return node

    for batch_size in (None, 50, 500):
        assert np.array_equal(codebook.assign(x, batch_size=batch_size), brute_force(x))
    half = x.astype(np.float16)
    assert np.array_equal(codebook.assign(half, batch_size=50), brute_force(half))


def test_deterministic_under_seed_and_version_is_content_hash():
    x, _ = planted(k=4, depth=2, per_leaf=15)
    first = HierarchicalCodebook.fit(x, k=4, depth=2, seed=7, iterations=20)
    second = HierarchicalCodebook.fit(x, k=4, depth=2, seed=7, iterations=20)
    assert first.version == second.version
    assert all(torch.equal(a, b) for a, b in zip(first.levels, second.levels, strict=True))
    other = HierarchicalCodebook.fit(x + 1.0, k=4, depth=2, seed=7, iterations=20)
    assert other.version != first.version


def test_empty_clusters_reseeded_and_small_nodes_handled():
    # Many duplicates + a few outliers: Lloyd leaves clusters empty unless they are re-seeded.
    x = np.zeros((200, 4), np.float32)
    x[:5] = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]] * 100
    generator = torch.Generator().manual_seed(0)
    centroids, labels, _ = kmeans(torch.as_tensor(x), 5, generator, iterations=10)
    assert len(torch.unique(labels)) == 5  # every cluster ends with members
    # Depth 3, k 4 on 6 points: nodes with fewer points than k, and nodes with none.
    tiny = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    codebook = HierarchicalCodebook.fit(tiny, k=4, depth=3, seed=0)
    assert codebook.levels[2].shape == (16, 4, 4)
    assert torch.isfinite(codebook.levels[2]).all()
    words = codebook.assign(tiny)
    assert len(set(words.tolist())) == 6  # six distinct points, six distinct words
    assert np.allclose(codebook.leaf_centroids[words].numpy(), tiny, atol=1e-5)


def test_batched_small_nodes_recover_tree_deterministically_and_match_per_node_fit(monkeypatch):
    # k 4, depth 3: every node below the root has < BATCH_FIT_ROWS points, so levels 1-2 are
    # fitted in padded batches; the same fit with batching off is the per-node reference.
    k, depth = 4, 3
    x, labels = planted(k=k, depth=depth, per_leaf=25, seed=5)
    batched = HierarchicalCodebook.fit(x, k=k, depth=depth, seed=3, iterations=50)
    again = HierarchicalCodebook.fit(x, k=k, depth=depth, seed=3, iterations=50)
    assert batched.version == again.version
    assert adjusted_rand_score(labels, batched.assign(x)) > 0.99
    monkeypatch.setattr(codebook_module, "BATCH_FIT_ROWS", 0)
    per_node = HierarchicalCodebook.fit(x, k=k, depth=depth, seed=3, iterations=50)
    assert per_node.version != batched.version  # the batched path did run above
    assert batched.inertia_per_level[-1] <= 1.02 * per_node.inertia_per_level[-1]


def test_batched_kmeans_masks_padding_and_reseeds_empty_clusters():
    # Three nodes of 30, 47 and 90 points (3 planted clusters each) in one padded batch:
    # padding repeats a node's last row, and must count nowhere.
    rng = np.random.default_rng(0)
    sizes = [30, 47, 90]
    blocks, truth = [], []
    for size in sizes:
        which = np.arange(size) % 3
        blocks.append(rng.normal(size=(3, 8))[which] * 50 + rng.normal(size=(size, 8)))
        truth.append(which)
    x = torch.as_tensor(np.concatenate(blocks).astype(np.float32))
    starts = np.cumsum([0, *sizes[:-1]])
    rows = torch.as_tensor(
        [[start + min(j, n - 1) for j in range(max(sizes))] for start, n in zip(starts, sizes, strict=True)]
    )
    counts = torch.as_tensor(sizes)
    centroids, labels, inertia = kmeans_batched(x, rows, counts, 3, torch.Generator().manual_seed(0), 50)
    again = kmeans_batched(x, rows, counts, 3, torch.Generator().manual_seed(0), 50)
    assert all(torch.equal(a, b) for a, b in zip((centroids, labels, inertia), again, strict=True))
    for b, n in enumerate(sizes):
        points, own = x[rows[b, :n]], labels[b, :n]
        assert adjusted_rand_score(truth[b], own.numpy()) == 1.0
        for j in range(3):  # converged: each centroid is the mean of its members alone
            assert torch.allclose(centroids[b, j], points[own == j].mean(0), atol=1e-3)
        assert float(inertia[b]) == pytest.approx(float(((points - centroids[b, own]) ** 2).sum()), rel=1e-4)
    # 20 points with 3 distinct values and k 6: seeds repeat, clusters go empty and are re-seeded.
    dup = torch.as_tensor(np.repeat(np.eye(3, 4, dtype=np.float32) * 10, [10, 6, 4], axis=0))
    centroids, labels, inertia = kmeans_batched(
        dup, torch.arange(20)[None], torch.tensor([20]), 6, torch.Generator().manual_seed(0), 10
    )
    assert torch.isfinite(centroids).all() and float(inertia[0]) == 0.0
    assert torch.equal(centroids[0, labels[0]], dup)  # every point sits on its own centroid


def test_kmeans_plus_plus_seeds_alike_from_a_gram_matrix_or_from_the_points(monkeypatch):
    # Small nodes read their dot products from a Gram matrix; the seeds must be the ones the
    # direct path picks from the same random draws, padding never drawn.
    rng = np.random.default_rng(2)
    points = torch.as_tensor(rng.normal(size=(3, 50, 64)).astype(np.float32))  # Gram: P <= dim
    counts = torch.tensor([50, 31, 13])
    x_sq = kmeans_module.squared_norms(points)

    def seeds() -> torch.Tensor:
        generator = torch.Generator().manual_seed(7)
        return kmeans_module._kmeans_plus_plus_batched(points, x_sq, counts, 8, generator)

    assert kmeans_module.GRAM_ROWS >= 50
    from_gram = seeds()
    monkeypatch.setattr(kmeans_module, "GRAM_ROWS", 0)
    assert torch.equal(from_gram, seeds())
    assert bool((from_gram < counts[:, None]).all())
    assert all(len(set(row.tolist())) == 8 for row in from_gram)  # distinct points: no repeats


def test_batched_kmeans_takes_the_same_steps_as_per_node_kmeans_from_the_same_seeds(monkeypatch):
    # Seeds forced alike on both paths: the Lloyd steps, early stop and empty-cluster
    # re-seeding must then agree. All four seeds on one point leave three clusters empty.
    rng = np.random.default_rng(1)
    sizes, k = [40, 64], 4
    nodes = [rng.normal(size=(k, 6))[np.arange(n) % k] * 10 + rng.normal(size=(n, 6)) for n in sizes]
    x = torch.as_tensor(np.concatenate(nodes).astype(np.float32))
    seeds = torch.tensor([[0, 0, 0, 0], [5, 1, 2, 3]])
    rows = torch.stack([torch.arange(64).clamp_max(39), torch.arange(40, 104)])
    monkeypatch.setattr(kmeans_module, "_kmeans_plus_plus_batched", lambda *args, **kwargs: seeds)
    centroids, labels, inertia = kmeans_batched(x, rows, torch.tensor(sizes), k, torch.Generator(), 20)
    for b, n in enumerate(sizes):
        points = x[rows[b, :n]]
        monkeypatch.setattr(kmeans_module, "_kmeans_plus_plus", lambda x, k, g, trials=None, b=b: x[seeds[b]])
        own_centroids, own_labels, own_inertia = kmeans(points, k, torch.Generator(), 20)
        assert torch.equal(labels[b, :n], own_labels)
        assert torch.allclose(centroids[b], own_centroids, atol=1e-4)
        assert float(inertia[b]) == pytest.approx(own_inertia, rel=1e-4)


@pytest.mark.parametrize("init_trials", [None, 1])
def test_training_subsample_still_recovers_the_tree(init_trials):
    # 60 points per leaf, at most 20 per centroid: both levels train on a subsample, and
    # every point is still labelled (inertia is over all of them). Classic k-means++ (1
    # trial, the fast setting) must do as well on well-separated clusters.
    k, depth = 4, 2
    x, labels = planted(k=k, depth=depth, per_leaf=60, seed=2)
    full = HierarchicalCodebook.fit(x, k=k, depth=depth, seed=0, iterations=50)
    fast = {"max_points_per_centroid": 20, "init_trials": init_trials}
    sampled = HierarchicalCodebook.fit(x, k=k, depth=depth, seed=0, iterations=50, **fast)
    again = HierarchicalCodebook.fit(x, k=k, depth=depth, seed=0, iterations=50, **fast)
    assert sampled.version == again.version and sampled.version != full.version
    assert adjusted_rand_score(labels, sampled.assign(x)) > 0.99
    assert sampled.inertia_per_level[-1] <= 1.05 * full.inertia_per_level[-1]
    words = sampled.assign(x)
    measured = ((x - sampled.leaf_centroids.numpy()[words]) ** 2).sum(1).mean()
    # The fit sums |x|^2 + |c|^2 - 2 x.c in float32; with |x|^2 ~ 1.5e7 here that is good to
    # about 1 per point (inertia ~100), so 1e-2, not 1e-3 (1 trial was off by 4.7e-3).
    assert sampled.inertia_per_level[-1] == pytest.approx(measured, rel=1e-2)
    assert sampled.metadata["init_trials"] == init_trials


def test_float16_input_and_shape_errors():
    x, _ = planted(k=4, depth=1)
    codebook = HierarchicalCodebook.fit(x.astype(np.float16), k=4, depth=1, seed=0)
    assert codebook.dim == x.shape[1]
    with pytest.raises(ValueError, match="shape"):
        codebook.assign(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="zero features"):
        HierarchicalCodebook.fit(np.zeros((0, 4), np.float32), k=2, depth=1)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_save_load_round_trip(where, tmp_path, request):
    output = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket") + "/exp"
    x, _ = planted(k=3, depth=2, per_leaf=10)
    codebook = HierarchicalCodebook.fit(x, k=3, depth=2, seed=0, encoder="s3d-test")
    assert latest_codebook(output) is None
    uri = codebook.save_to_output(output)
    assert latest_codebook(output) == uri and latest_codebook(output, k=4) is None
    loaded = HierarchicalCodebook.load(uri)
    assert loaded.version == codebook.version
    assert loaded.metadata["encoder"] == "s3d-test" and loaded.inertia_per_level == codebook.inertia_per_level
    assert np.array_equal(loaded.assign(x), codebook.assign(x))
