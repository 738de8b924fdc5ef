"""Hierarchical k-means: planted clusters, prefix consistency, determinism, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from videobert.codebook import HierarchicalCodebook, kmeans, latest_codebook


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


def test_assignment_matches_brute_force_descent_in_any_chunking():
    # Skewed data: a few nodes get hundreds of rows (one matmul each), most a handful (the
    # batched path); batch sizes that split nodes across chunks must not change a word.
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(size=(1200, 8)), rng.normal(size=(100, 8)) * 5 + 20]).astype(np.float32)
    k, depth = 5, 3
    codebook = HierarchicalCodebook.fit(x, k=k, depth=depth, seed=0, iterations=5)
    levels = [level.numpy().astype(np.float64) for level in codebook.levels]
    node = np.zeros(len(x), np.int64)
    for level in levels:
        children = level[node]  # (n, k, dim): each row's own k candidates
        node = node * k + ((children - x[:, None, :].astype(np.float64)) ** 2).sum(-1).argmin(1)
    for batch_size in (None, 50, 500):
        assert np.array_equal(codebook.assign(x, batch_size=batch_size), node)


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
