"""Evaluation: hand-worked ranking metrics, masking, baselines, ALS on ML-100K, cost measures."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import EvalConfig
from pipeline.data.features import load_item_table
from pipeline.evaluation import (
    EmbeddingScorer,
    FoldInScorer,
    History,
    MostPopularScorer,
    QueryScorer,
    Scorer,
    directory_bytes,
    evaluate_scorer,
    fit_als,
    measure_latency,
    ranking_metrics,
    top_k_items,
    train_als_model,
)
from pipeline.evaluation.serving_cost import count_trainable_params

INF = float("inf")
D2 = 1 / math.log2(3)  # discount of rank 2 = 0.63093


# ----------------------------------------------------------------------------- ranking_metrics


def test_ranking_metrics_three_users_by_hand():
    scores = np.array(
        [
            [-INF, 0.9, 0.1, 0.5, 0.3],  # ranking 1, 3, 4, 2
            [-INF, 0.2, 0.8, -INF, 0.4],  # ranking 2, 4, 1 (3 masked)
            [-INF, 0.7, 0.7, 0.6, 0.0],  # ranking 1, 2 (tie -> lower index first), 3, 4
        ],
        dtype=np.float32,
    )
    relevant = [np.array([1, 3]), np.array([1, 4]), np.array([4])]
    m = ranking_metrics(scores, relevant, ks=(2,), hitrate_k=2)

    # user 0: top-2 = [1, 3], both relevant -> recall 2/2 = 1; DCG = 1 + 1/log2(3) = IDCG -> ndcg 1;
    #         best relevant (1) is ranked first -> mrr 1.
    # user 1: top-2 = [2, 4], hit at rank 2 -> recall 1/2; DCG = 0.63093,
    #         IDCG over min(2, 2) = 2 hits = 1 + 0.63093 = 1.63093 -> ndcg 0.38685;
    #         best relevant is 4 (0.4), only item 2 scores higher -> rank 2, mrr 0.5.
    # user 2: top-2 = [1, 2], no hit -> recall 0, ndcg 0, hitrate 0;
    #         relevant 4 scores 0.0, items 1, 2, 3 score higher -> rank 4, mrr 0.25.
    assert m["recall@2"] == pytest.approx([1.0, 0.5, 0.0])
    assert m["ndcg@2"] == pytest.approx([1.0, D2 / (1 + D2), 0.0])
    assert m["ndcg@2"][1] == pytest.approx(0.38685, abs=1e-5)
    assert m["hitrate@2"] == pytest.approx([1.0, 1.0, 0.0])
    assert m["mrr"] == pytest.approx([1.0, 0.5, 0.25])
    # Averages over the 3 users: recall 1.5/3 = 0.5; ndcg 1.38685/3 = 0.46228; mrr 1.75/3 = 0.58333.
    assert m["recall@2"].mean() == pytest.approx(0.5)
    assert m["ndcg@2"].mean() == pytest.approx(0.46228, abs=1e-5)
    assert m["mrr"].mean() == pytest.approx(0.58333, abs=1e-5)


def test_ranking_metrics_ideal_dcg_stops_at_k():
    # 3 relevant items, all in the top 2: DCG@2 = 1 + 0.63093; IDCG@2 counts min(3, 2) = 2 hits -> ndcg 1,
    # while recall@2 = 2/3.
    scores = np.array([[-INF, 0.9, 0.8, 0.7, 0.1]])
    m = ranking_metrics(scores, [np.array([1, 2, 3])], ks=(2,))
    assert m["ndcg@2"] == pytest.approx([1.0])
    assert m["recall@2"] == pytest.approx([2 / 3])


def test_ties_break_by_item_index_in_top_k_and_mrr():
    # Items 1 and 2 tie at 0.7: item 1 ranks first, so relevant item 2 is at rank 2 in both the
    # top-k (no hit at k=1) and the mrr (1/2): the two never disagree.
    scores = np.array([[-INF, 0.7, 0.7, 0.1]])
    m = ranking_metrics(scores, [np.array([2])], ks=(1,))
    assert m["recall@1"] == pytest.approx([0.0])
    assert m["mrr"] == pytest.approx([0.5])
    # Five items tied with the 3 best: the lowest indices win, then best first.
    tied = np.array([[0.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0]])
    assert top_k_items(tied, 4).tolist() == [[1, 7, 2, 3]]
    assert top_k_items(tied[:, ::-1].copy(), 4).tolist() == [[6, 0, 1, 2]]


def test_ranking_metrics_rejects_bad_input():
    scores = np.zeros((2, 4))
    with pytest.raises(ValueError, match="no relevant items"):
        ranking_metrics(scores, [np.array([1]), np.array([], dtype=int)], ks=(2,))
    with pytest.raises(ValueError, match="B = len"):
        ranking_metrics(scores, [np.array([1])], ks=(2,))
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        ranking_metrics(scores, [np.array([1]), np.array([4])], ks=(2,))
    with pytest.raises(ValueError, match="NaN"):
        ranking_metrics(np.array([[0.0, np.nan]]), [np.array([1])], ks=(1,))
    with pytest.raises(ValueError, match=">= 1"):
        ranking_metrics(scores, [np.array([1]), np.array([2])], ks=(0,))


# ----------------------------------------------------------------------------- tiny feature set

# Items 1..5 (index 0 is padding), users 1..4.
#   user 1: train {1}, validation {2}, test {3, 4}
#   user 2: train {2}, validation {3}, test {1}
#   user 3: train {4, 5}; user 4: train {4}   (train-only: never evaluated)
SPLIT_PAIRS = {
    "train": [(1, 1), (2, 2), (3, 4), (3, 5), (4, 4)],
    "validation": [(1, 2), (2, 3)],
    "test": [(1, 3), (1, 4), (2, 1)],
}
# Train interactions per item 1..5: item 1: 1, item 2: 1, item 3: 0, item 4: 2, item 5: 1.
POPULARITY = [1, 1, 0, 2, 1]
TINY_CFG = EvalConfig(ks=(1, 2), batch_size=1)  # batch of 1 user: exercises batching


@pytest.fixture
def tiny_features(tmp_path: Path) -> Path:
    for split, pairs in SPLIT_PAIRS.items():
        directory = tmp_path / "interactions" / f"split={split}"
        directory.mkdir(parents=True)
        table = pa.table(
            {
                "user_idx": pa.array([u for u, _ in pairs], pa.int32()),
                "item_idx": pa.array([i for _, i in pairs], pa.int32()),
                "weight": pa.array([1.0] * len(pairs), pa.float64()),
            }
        )
        pq.write_table(table, directory / "part.parquet")
    (tmp_path / "item_features").mkdir()
    items = pa.table(
        {
            "item_idx": pa.array([1, 2, 3, 4, 5], pa.int32()),
            "item_id": ["i1", "i2", "i3", "i4", "i5"],
            "year": pa.array([1990, 1995, None, 2000, 1980], pa.int32()),
            "categories": [["Drama"], ["Comedy"], [], ["Drama", "War"], None],
            "popularity": pa.array(POPULARITY, pa.int32()),
        }
    )
    pq.write_table(items, tmp_path / "item_features" / "part.parquet")
    return tmp_path


def identity_scorer(rows: dict[int, list[float]]) -> EmbeddingScorer:
    """An EmbeddingScorer whose scores are the given rows (item vectors = identity)."""
    users = np.zeros((5, 6), dtype=np.float32)
    for user, row in rows.items():
        users[user] = row
    return EmbeddingScorer(users, np.eye(6, dtype=np.float32))


def test_embedding_scorer_is_dot_product():
    scorer = EmbeddingScorer(np.array([[0.0, 0.0], [1.0, 2.0]]), np.array([[0.0, 0.0], [3.0, 1.0], [-1.0, 1.0]]))
    # user 1 = (1, 2): item 1 -> 1*3 + 2*1 = 5; item 2 -> -1 + 2 = 1.
    assert scorer.num_items == 3
    np.testing.assert_allclose(scorer.score(np.array([1], np.int32)), [[0.0, 5.0, 1.0]])
    assert scorer.score(np.array([1, 0], np.int32)).dtype == np.float32
    assert isinstance(scorer, Scorer)
    with pytest.raises(ValueError, match="outside"):
        scorer.score(np.array([2]))
    with pytest.raises(ValueError, match="differ in width"):
        EmbeddingScorer(np.zeros((2, 3)), np.zeros((3, 2)))


def test_evaluate_scorer_masks_earlier_splits(tiny_features):
    # Score rows over items 0..5. User 1's highest real scores go to its train item 1 (8) and
    # validation item 2 (7): both are masked, so they neither count nor push test items down.
    scorer = identity_scorer({1: [9, 8, 7, 5, 6, 1], 2: [9, 2, 9, 9, 3, 1]})
    m = evaluate_scorer(scorer, tiny_features, "test", TINY_CFG)
    # user 1: masked 0, 1, 2; left 3 (5), 4 (6), 5 (1) -> ranking 4, 3, 5; relevant {3, 4}.
    #   recall@1 = 1/2, ndcg@1 = 1/1 = 1; recall@2 = 1, ndcg@2 = 1; mrr 1; hit@10 1.
    # user 2: masked 0, 2 (train), 3 (validation); left 1 (2), 4 (3), 5 (1) -> ranking 4, 1, 5; relevant {1}.
    #   recall@1 = 0, ndcg@1 = 0; recall@2 = 1, ndcg@2 = 0.63093 / 1; mrr 1/2; hit@10 1.
    # coverage@10: top-10 holds every unmasked item: {3, 4, 5} | {1, 4, 5} = 4 of the 5 real items.
    assert m == pytest.approx(
        {
            "recall@1": 0.25, "recall@2": 1.0, "ndcg@1": 0.5, "ndcg@2": (1 + D2) / 2,
            "hitrate@10": 1.0, "mrr": 0.75, "coverage@10": 0.8, "users": 2,
        }
    )
    assert list(m) == ["recall@1", "recall@2", "ndcg@1", "ndcg@2", "hitrate@10", "mrr", "coverage@10", "users"]
    # Same answer whatever the batch size.
    assert evaluate_scorer(scorer, tiny_features, "test", dataclasses.replace(TINY_CFG, batch_size=512)) == m


def test_evaluate_scorer_streams_user_ranges_and_hands_over_history(tiny_features):
    scorer = identity_scorer({1: [9, 8, 7, 5, 6, 1], 2: [9, 2, 9, 9, 3, 1]})
    whole = evaluate_scorer(scorer, tiny_features, "test", TINY_CFG)
    # One pair per range: users 1 and 2 are evaluated from different spilled ranges, same answer.
    assert evaluate_scorer(scorer, tiny_features, "test", dataclasses.replace(TINY_CFG, pairs_per_chunk=1)) == whole

    seen = {}

    class Recording:
        num_items = 6

        def score(self, user_idx, history):
            for row, user in enumerate(user_idx):
                seen[int(user)] = sorted(history.items[history.rows == row].tolist())
            return scorer.score(user_idx)

    assert evaluate_scorer(Recording(), tiny_features, "test", dataclasses.replace(TINY_CFG, batch_size=4)) == whole
    # The history is what came before test: user 1 train {1} + validation {2}; user 2 {2} + {3}.
    assert seen == {1: [1, 2], 2: [2, 3]}


def test_query_scorer_embeds_each_batch():
    items = np.array([[0.0, 0.0], [3.0, 1.0], [-1.0, 1.0]])
    asked = []

    def embed(user_idx):
        asked.append(user_idx.tolist())
        return np.stack([user_idx, 2 * user_idx], axis=1).astype(np.float32)  # user u -> (u, 2u)

    scorer = QueryScorer(embed, items)
    # user 1 = (1, 2): item 1 -> 3 + 2 = 5, item 2 -> -1 + 2 = 1; user 2 = (2, 4): 10 and 2.
    np.testing.assert_allclose(scorer.score(np.array([1, 2], np.int32)), [[0, 5, 1], [0, 10, 2]])
    assert asked == [[1, 2]]
    with pytest.raises(ValueError, match="2-D"):
        QueryScorer(embed, np.zeros(3))


def test_fold_in_solves_the_implicit_als_user_update_by_hand():
    # Rank 1, item factors y = 0 (padding), 1, 2; alpha 0.5, reg 0.1; Y^T Y = 0 + 1 + 4 = 5.
    scorer = FoldInScorer(np.array([[0.0], [1.0], [2.0]]), alpha=0.5, reg=0.1)
    history = History(rows=np.array([0, 1, 1]), items=np.array([1, 1, 2]), weights=np.array([2.0, 2.0, -1.0], np.float32))
    vectors = scorer.user_vectors(3, history)
    # row 0: item 1, weight 2 -> c = 1: (5 + 1 * 1 + 0.1 * 1) x = (1 + 1) * 1 -> x = 2 / 6.1.
    # row 1: plus disliked item 2, c = 0.5: lhs + 0.5 * 4, not counted in n nor in the rhs -> x = 2 / 8.1.
    # row 2: no history -> zeros.
    np.testing.assert_allclose(vectors[:, 0], [2 / 6.1, 2 / 8.1, 0.0], rtol=1e-6)
    np.testing.assert_allclose(scorer.score(np.array([7, 8, 9]), history)[0], [0.0, 2 / 6.1, 4 / 6.1], rtol=1e-6)


def test_evaluate_scorer_on_validation_masks_only_train(tiny_features):
    scorer = identity_scorer({1: [9, 8, 7, 5, 6, 1], 2: [9, 2, 9, 9, 3, 1]})
    m = evaluate_scorer(scorer, tiny_features, "validation", TINY_CFG)
    # user 1: masked 0, 1; ranking 2 (7), 4 (6), 3 (5), 5 (1) -- its test items stay candidates;
    #   relevant {2} is first. user 2: masked 0, 2; ranking 3 (9), 4 (3), 1 (2), 5 (1); relevant {3} first.
    # coverage: {2, 3, 4, 5} | {1, 3, 4, 5} = all 5 items.
    assert m["users"] == 2
    assert m["recall@1"] == pytest.approx(1.0)
    assert m["mrr"] == pytest.approx(1.0)
    assert m["coverage@10"] == pytest.approx(1.0)


def test_most_popular_on_tiny_features(tiny_features):
    scorer = MostPopularScorer(load_item_table(tiny_features).popularity)
    np.testing.assert_allclose(scorer.score(np.array([1, 2]))[1], [0, 1, 1, 0, 2, 1])
    m = evaluate_scorer(scorer, tiny_features, "test", TINY_CFG)
    # user 1: masked 0, 1, 2; left 3 (0), 4 (2), 5 (1) -> ranking 4, 5, 3; relevant {3, 4}.
    #   recall@1 = 1/2, ndcg@1 = 1; recall@2 = 1/2, ndcg@2 = 1 / (1 + 0.63093) = 0.61315; mrr 1.
    # user 2: masked 0, 2, 3; left 1 (1), 4 (2), 5 (1) -> ranking 4, 1, 5 (1 and 5 tie: lower index first);
    #   relevant {1}: recall@1 = 0; recall@2 = 1, ndcg@2 = 0.63093; mrr 1/2.
    assert m == pytest.approx(
        {
            "recall@1": 0.25, "recall@2": 0.75, "ndcg@1": 0.5, "ndcg@2": (1 / (1 + D2) + D2) / 2,
            "hitrate@10": 1.0, "mrr": 0.75, "coverage@10": 0.8, "users": 2,
        }
    )
    assert m["ndcg@2"] == pytest.approx(0.62204, abs=1e-5)


def test_evaluate_scorer_rejects_bad_input(tiny_features):
    good = identity_scorer({})
    with pytest.raises(ValueError, match="split must be one of"):
        evaluate_scorer(good, tiny_features, "holdout", TINY_CFG)
    with pytest.raises(ValueError, match="different item vocabulary"):
        evaluate_scorer(EmbeddingScorer(np.zeros((5, 2)), np.zeros((4, 2))), tiny_features, "test", TINY_CFG)

    class WrongWidth:
        num_items = 6

        def score(self, user_idx, history):
            return np.zeros((len(user_idx), 5), np.float32)

    with pytest.raises(ValueError, match=r"returned shape \(1, 5\), expected \(1, 6\)"):
        evaluate_scorer(WrongWidth(), tiny_features, "test", TINY_CFG)

    class NaNScores:
        num_items = 6

        def score(self, user_idx, history):
            return np.full((len(user_idx), 6), np.nan, np.float32)

    with pytest.raises(ValueError, match="NaN"):
        evaluate_scorer(NaNScores(), tiny_features, "test", TINY_CFG)


# ----------------------------------------------------------------------------- ALS on ML-100K


@pytest.fixture(scope="module")
def ml100k_features(spark, tmp_path_factory) -> Path:
    """Real ML-100K features, built here (the converter and the feature job, GX off for speed)."""
    import datetime as dt

    from pipeline.config import FeatureConfig
    from pipeline.data.movielens import convert_movielens
    from spark_jobs import extract_features as job

    root = tmp_path_factory.mktemp("ml100k")
    convert_movielens(root / "raw")
    job.run(spark, root / "raw", root / "features", dt.date(1998, 4, 22), FeatureConfig(window_days=240, shuffle_partitions=2),
            validate_data=False)
    return root / "features" / "ds=1998-04-22"


def train_history(features: Path, splits: tuple[str, ...]) -> History:
    """Every user's interactions of ``splits`` as one batch whose row is the ``user_idx``."""
    table = pq.read_table(features / "interactions", filters=[("split", "in", list(splits))])
    order = np.argsort(table.column("user_idx").to_numpy(), kind="stable")
    column = lambda name: table.column(name).to_numpy()[order]  # noqa: E731
    return History(column("user_idx").astype(np.int64), column("item_idx").astype(np.int64), column("weight"))


def test_als_beats_random_on_ml100k(spark, ml100k_features, tmp_path):
    ML100K = ml100k_features
    cfg = dataclasses.replace(EvalConfig(), als_rank=16, als_iterations=5)
    als = fit_als(ML100K, cfg, seed=42, spark=spark)
    # 1682 items plus padding row 0 (all zeros: no factors); no user factors are kept.
    assert als.item_vectors.shape == (1683, 16) and not als.item_vectors[0].any()
    rng = np.random.default_rng(0)
    random = EmbeddingScorer(rng.normal(size=(944, 16)), rng.normal(size=(1683, 16)))
    als_metrics = evaluate_scorer(als, ML100K, "test", cfg)
    random_metrics = evaluate_scorer(random, ML100K, "test", cfg)
    assert als_metrics["users"] == random_metrics["users"] == 943
    # Random: about 20 / 1600 candidates ~ 0.013 recall@20; ALS is far above.
    assert als_metrics["recall@20"] > 3 * random_metrics["recall@20"]
    assert als_metrics["ndcg@20"] > random_metrics["ndcg@20"]

    # Spark's own user update, redone from the train history with the fitted item factors,
    # gives back the users Spark fitted (collected here only, on 943 users).
    spark.sparkContext.setCheckpointDir(str(tmp_path))
    model = train_als_model(spark, ML100K, cfg, 42, ("train",))
    fitted = np.zeros((944, 16), np.float32)
    for row in model.userFactors.collect():
        fitted[row["id"]] = row["features"]
    items = np.zeros((1683, 16), np.float32)
    for row in model.itemFactors.collect():
        items[row["id"]] = row["features"]
    np.testing.assert_array_equal(items, als.item_vectors)  # same seed, same fit
    folded = als.user_vectors(944, train_history(ML100K, ("train",)))
    np.testing.assert_allclose(folded, fitted, rtol=1e-3, atol=1e-4)
    # Folding in validation too changes the users who have validation interactions.
    newer = als.user_vectors(944, train_history(ML100K, ("train", "validation")))
    with_validation = np.unique(train_history(ML100K, ("validation",)).rows)
    assert not np.allclose(newer[with_validation], fitted[with_validation], atol=1e-3)


# ----------------------------------------------------------------------------- cost measures


def test_count_trainable_params_and_directory_bytes(tmp_path):
    import tensorflow as tf

    model = tf.keras.Sequential([tf.keras.layers.Embedding(4, 8), tf.keras.layers.Dense(3)])
    model.build((None,))
    frozen = tf.keras.layers.Dense(2)
    frozen.build((None, 3))
    frozen.trainable = False
    # Embedding 4 x 8 = 32; Dense 8 -> 3: 8*3 + 3 = 27; total 59. A frozen layer adds nothing.
    assert count_trainable_params(model) == 59
    assert count_trainable_params(tf.keras.Sequential([model, frozen])) == 59

    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "variables").mkdir()
    (tmp_path / "variables" / "b.bin").write_bytes(b"hello")
    assert directory_bytes(tmp_path) == 3 + 5
    with pytest.raises(FileNotFoundError, match="not a directory"):
        directory_bytes(tmp_path / "missing")


@pytest.fixture(scope="module")
def brute_force_model(tmp_path_factory) -> Path:
    """A TFRS BruteForce top-100 index over 128 items, for 3 known users, saved as a SavedModel."""
    import tensorflow as tf
    import tensorflow_recommenders as tfrs

    tf.keras.utils.set_random_seed(0)
    query_model = tf.keras.Sequential(
        [tf.keras.layers.StringLookup(vocabulary=["u1", "u2", "u3"]), tf.keras.layers.Embedding(4, 8)]
    )
    item_ids = np.array([f"i{j}" for j in range(128)])
    item_vectors = np.random.default_rng(0).normal(size=(128, 8)).astype(np.float32)
    index = tfrs.layers.factorized_top_k.BruteForce(query_model, k=100)
    index.index_from_dataset(tf.data.Dataset.from_tensor_slices((item_ids, item_vectors)).batch(32))
    index(tf.constant(["u1"]))
    path = tmp_path_factory.mktemp("models") / "brute_force"
    tf.saved_model.save(index, str(path))
    return path


def test_measure_latency_on_brute_force_savedmodel(brute_force_model):
    cfg = dataclasses.replace(EvalConfig(), latency_batch_size=5, latency_repeats=7)
    # 3 ids cycled into batches of 5 (one id unknown to the lookup: it maps to the OOV row).
    result = measure_latency(brute_force_model, np.array(["u1", "u2", "nobody"]), cfg)
    assert set(result) == {"latency_ms_p50", "latency_ms_p99", "throughput_users_per_s", "batch_size"}
    assert result["batch_size"] == 5
    for name in ("latency_ms_p50", "latency_ms_p99", "throughput_users_per_s"):
        assert math.isfinite(result[name]) and result[name] > 0
    assert result["latency_ms_p99"] >= result["latency_ms_p50"]
    assert result["throughput_users_per_s"] == pytest.approx(5 / (result["latency_ms_p50"] / 1000))
    assert directory_bytes(brute_force_model) > 0


def test_measure_latency_rejects_bad_input(brute_force_model, tmp_path):
    import tensorflow as tf

    cfg = dataclasses.replace(EvalConfig(), latency_batch_size=2, latency_repeats=1)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        measure_latency(brute_force_model, np.array([], dtype=str), cfg)
    with pytest.raises(ValueError, match=">= 1"):
        measure_latency(brute_force_model, np.array(["u1"]), dataclasses.replace(cfg, latency_repeats=0))

    class Scores(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, ids):
            return tf.zeros([tf.shape(ids)[0], 10])

    tf.saved_model.save(Scores(), str(tmp_path / "scores_only"))
    with pytest.raises(ValueError, match=r"must return \(scores \[B, K\], item_ids \[B, K\]\)"):
        measure_latency(tmp_path / "scores_only", np.array(["u1"]), cfg)
