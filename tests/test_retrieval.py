"""The IVF top-K index: hand-worked partitions and results, exactness, recall, SavedModel round trip."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs

from pipeline.config import ConfigError, ServingConfig
from pipeline.evaluation import SavedModelScorer
from pipeline.modeling.retrieval import IVFTopK, block_top_k, build_index, partition_items, save_index

# Six unit vectors in 2-D: A near (1, 0) and B = -A near (-1, 0).
A = [[1.0, 0.0], [0.96, 0.28], [0.8, 0.6]]
SIX = np.array(A + [[-x, -y] for x, y in A], np.float32)
SIX_IDS = np.array(["a0", "a1", "a2", "b0", "b1", "b2"])
TWO = ServingConfig(top_k=2, index="ivf", num_partitions=2, probe_partitions=1)


def clustered(n: int, dim: int, clusters: int, seed: int, spread: float = 0.3) -> np.ndarray:
    """``[n, dim]`` unit vectors around ``clusters`` random unit centres (noise of norm about ``spread``)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(clusters, size=n)] + spread * rng.normal(size=(n, dim)) / math.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top_k(queries: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ items.T), axis=1, kind="stable")[:, :k]


def test_two_partitions_by_hand():
    parts = partition_items(SIX, num_partitions=2, capacity=1.5, min_size=2, iterations=5, seed=0)
    # k-means splits A from B; each centroid is its side's normalised mean: mean of A =
    # (0.92, 0.29333), norm 0.96563 -> (0.95275, 0.30378), and its negative.
    assert sorted(sorted(r[r >= 0].tolist()) for r in parts.rows) == [[0, 1, 2], [3, 4, 5]]
    a_side = int(np.flatnonzero([0 in r for r in parts.rows])[0])
    np.testing.assert_allclose(parts.centroids[a_side], [0.95275, 0.30378], atol=1e-4)
    np.testing.assert_allclose(parts.centroids[1 - a_side], [-0.95275, -0.30378], atol=1e-4)

    index = build_index(None, SIX, SIX_IDS, TWO)
    # Query (-0.28, 0.96) scores A's centroid -0.26677 + 0.29163 = 0.02486 and B's -0.02486, so
    # probing 1 partition scores only A: a0 -0.28, a1 -0.2688 + 0.2688 = 0, a2 -0.224 + 0.576 = 0.352.
    # Exact top-2 is a2 (0.352) then b0 (0.28), which sits in the unprobed partition.
    scores, ids = index(tf.constant([[-0.28, 0.96]]))
    assert ids.numpy().astype(str).tolist() == [["a2", "a1"]]
    np.testing.assert_allclose(scores.numpy(), [[0.352, 0.0]], atol=1e-6)
    # Probing both partitions is brute force.
    scores, ids = build_index(None, SIX, SIX_IDS, dataclasses.replace(TWO, probe_partitions=2))(tf.constant([[-0.28, 0.96]]))
    assert ids.numpy().astype(str).tolist() == [["a2", "b0"]]
    np.testing.assert_allclose(scores.numpy(), [[0.352, 0.28]], atol=1e-6)


@pytest.mark.parametrize("probe", [5, 9])
def test_probing_every_partition_equals_brute_force(probe):
    points = clustered(317, 8, 6, seed=1)
    items, queries = points[:300], points[300:]  # queries from the items' clusters
    serving = ServingConfig(top_k=25, index="ivf", num_partitions=5, probe_partitions=probe)
    index = build_index(None, items, np.arange(300), serving)
    assert index.is_exact()
    scores, ids = index(tf.constant(queries))
    expected = exact_top_k(queries, items, 25)
    np.testing.assert_array_equal(ids.numpy(), expected)
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(queries @ items.T, expected, axis=1), rtol=1e-5, atol=1e-6)
    brute = build_index(None, items, np.arange(300), dataclasses.replace(serving, index="brute_force"))
    np.testing.assert_array_equal(brute(tf.constant(queries))[1].numpy(), expected)


def test_default_probe_recall_on_clustered_items():
    points = clustered(20_064, 16, 400, seed=3)
    items, queries = points[:20_000], points[20_000:]
    index = build_index(None, items, np.arange(20_000), ServingConfig(index="ivf"))  # 141 partitions, 32 probed
    assert not index.is_exact()
    _, ids = index(tf.constant(queries))
    exact = exact_top_k(queries, items, 100)
    recall = np.mean([len(set(got) & set(want)) / 100 for got, want in zip(ids.numpy(), exact)])
    assert recall >= 0.9


def test_shapes_dtypes_and_no_padding_returned():
    points = clustered(540, 4, 3, seed=5)  # few clusters, many partitions: partitions spill and are padded
    items, queries = points[:500], points[500:]
    serving = ServingConfig(top_k=30, index="ivf", num_partitions=10, probe_partitions=2, partition_capacity=1.2)
    parts = partition_items(items, 10, 1.2, min_size=15, iterations=10, seed=0)
    assert sorted(parts.rows[parts.rows >= 0].tolist()) == list(range(500))  # every item exactly once
    assert parts.sizes.max() <= math.ceil(1.2 * 500 / len(parts.sizes)) and parts.sizes.min() >= 15
    assert (parts.rows < 0).any() and not parts.vectors[parts.rows < 0].any()  # padded with zeros
    index = build_index(None, items, np.array([f"i{j}" for j in range(500)]), serving)
    scores, ids = index(tf.constant(queries))
    assert scores.shape == (40, 30) and ids.shape == (40, 30)
    assert scores.dtype == tf.float32 and ids.dtype == tf.string
    assert np.isfinite(scores.numpy()).all()
    assert all(len(set(row)) == 30 for row in ids.numpy())  # distinct, real items
    assert (np.diff(scores.numpy(), axis=1) <= 0).all()  # best first


def test_same_seed_same_partitions():
    items = clustered(400, 8, 7, seed=7)
    first, again = (partition_items(items, 12, 1.5, 1, 10, seed=11) for _ in range(2))
    for name in ("centroids", "vectors", "rows"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))


def test_saved_model_round_trip(tmp_path):
    tf.keras.utils.set_random_seed(0)
    users = ["u1", "u2", "u3"]
    query_model = tf.keras.Sequential([tf.keras.layers.StringLookup(vocabulary=users),
                                       tf.keras.layers.Embedding(4, 8)])
    items, item_ids = clustered(200, 8, 5, seed=8), np.array([f"i{j}" for j in range(200)])
    for kind in ("ivf", "brute_force"):
        index = build_index(query_model, items, item_ids, ServingConfig(top_k=10, index=kind, probe_partitions=3, block_size=4))
        batch = tf.constant(users + ["nobody"])
        before = index(batch)
        if kind == "brute_force":  # selection by blocks of 4 items is exact
            exact_scores, exact_rows = tf.math.top_k(tf.matmul(query_model(batch), items, transpose_b=True), k=10)
            np.testing.assert_allclose(before[0].numpy(), exact_scores.numpy(), rtol=1e-6)
            np.testing.assert_array_equal(before[1].numpy().astype(str), item_ids[exact_rows.numpy()])
        loaded = tf.saved_model.load(str(save_index(index, ["u1"], tmp_path / kind)))
        after = loaded(batch)
        np.testing.assert_allclose(after[0].numpy(), before[0].numpy(), rtol=1e-6)
        np.testing.assert_array_equal(after[1].numpy(), before[1].numpy())
        # Exact offline evaluation reads the same names whatever the index.
        np.testing.assert_array_equal(loaded.item_vectors.numpy(), items)
        np.testing.assert_array_equal(loaded.item_ids.numpy().astype(str), item_ids)
        assert loaded.query_model(batch).shape == (4, 8)
        scorer = SavedModelScorer(tmp_path / kind, np.array(users), item_ids[::-1])
        np.testing.assert_allclose(scorer.score(np.array([0, 2])),
                                   query_model(tf.constant(["u1", "u3"])).numpy() @ items[::-1].T, rtol=1e-5, atol=1e-6)
    # A champion exported before these names existed is a bare tfrs BruteForce; it is still scored.
    legacy = tfrs.layers.factorized_top_k.BruteForce(query_model, k=10)
    legacy.index(tf.constant(items), tf.constant(item_ids))
    scorer = SavedModelScorer(save_index(legacy, ["u1"], tmp_path / "legacy"), np.array(users), item_ids)
    np.testing.assert_allclose(scorer.score(np.array([1])), query_model(tf.constant(["u2"])).numpy() @ items.T, rtol=1e-5, atol=1e-6)


def test_block_selection_by_hand():
    # Blocks of 2: [1, 9] [2, 8] [7, 3] [0, pad]; maxima 9, 8, 7, 0 -> blocks 0 and 1 -> among
    # [1, 9, 2, 8] the best two are 9 (column 1) and 8 (column 3). Item 7 (column 4) loses to 8.
    values, indices = block_top_k(tf.constant([[1.0, 9.0, 2.0, 8.0, 7.0, 3.0, 0.0]]), k=2, block_size=2)
    np.testing.assert_array_equal(values.numpy(), [[9.0, 8.0]])
    np.testing.assert_array_equal(indices.numpy(), [[1, 3]])


@pytest.mark.parametrize("n, k, block_size", [(1682, 100, 4), (1000, 10, 7), (50, 5, 3), (997, 100, 32), (40, 10, 5)])
def test_block_selection_equals_a_full_top_k(n, k, block_size):
    scores = tf.constant(np.random.default_rng(n).normal(size=(6, n)), tf.float32)  # no ties
    values, indices = block_top_k(scores, k=k, block_size=block_size)
    want_values, want_indices = tf.math.top_k(scores, k=k)
    np.testing.assert_array_equal(values.numpy(), want_values.numpy())
    np.testing.assert_array_equal(indices.numpy(), want_indices.numpy())


@pytest.mark.parametrize("setting, message", [
    ({"index": "hnsw"}, "serving.index must be 'ivf' or 'brute_force'"),
    ({"num_partitions": -1}, "serving.num_partitions and kmeans_iterations must be >= 0"),
    ({"probe_partitions": 0}, "serving.probe_partitions must be >= 1"),
    ({"partition_capacity": 0.5}, "serving.partition_capacity must be >= 1"),
    ({"kmeans_iterations": -1}, "serving.num_partitions and kmeans_iterations must be >= 0"),
    ({"block_size": -1}, "serving.block_size must be >= 0"),
])
def test_bad_settings_are_named(setting, message):
    with pytest.raises(ConfigError, match=message):
        ServingConfig(**setting)


def test_bad_index_inputs_are_named():
    with pytest.raises(ValueError, match=r"serving.num_partitions \(7\) exceeds the 6 items"):
        build_index(None, SIX, SIX_IDS, dataclasses.replace(TWO, num_partitions=7))
    with pytest.raises(ValueError, match=r"need candidates \[n, d\] and identifiers \[n\]"):
        IVFTopK(TWO).index(tf.constant(SIX), tf.constant(SIX_IDS[:5]))
    with pytest.raises(ValueError, match="call index"):
        IVFTopK(TWO)(tf.constant(SIX[:1]))
    # Partitions keep >= k / probe = 2 items, so one probed partition reaches 3 items, not 4.
    with pytest.raises(ValueError, match="k=4 exceeds the 3 items the smallest probe of 1 partitions reaches"):
        build_index(None, SIX, SIX_IDS, TWO)(tf.constant(SIX[:1]), k=4)
