"""EASE: the closed form by hand, the scorer, l2 chosen on validation, the item limit, and EASE against popularity."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, EvalConfig
from pipeline.data.features import load_item_table
from pipeline.evaluation import (
    EaseScorer,
    History,
    MostPopularScorer,
    ease_skip_reason,
    ease_weights,
    evaluate_scorer,
    fit_ease,
)
from pipeline.evaluation import ease as ease_module

D2 = 1 / math.log2(3)  # NDCG@10 of one relevant item ranked second = 0.63093

# Three users over items a, b, c: {a, b}, {b, c}, {b}.
#   G = X^T X = [[1, 1, 0], [1, 3, 1], [0, 1, 1]]; with l2 = 1, A = G + I = [[2, 1, 0], [1, 4, 1], [0, 1, 2]],
#   det A = 2 * 7 - 1 * 2 = 12, P = A^-1 = [[7, -2, 1], [-2, 4, -2], [1, -2, 7]] / 12, diag(P) = [7, 4, 7] / 12.
#   B_ij = -P_ij / P_jj: B_ab = 2/4 = 1/2, B_ba = 2/7, B_ac = B_ca = -1/7 (never together), B_bc = 2/7,
#   B_cb = 1/2; diagonal 0.
# Independently, column j of B is the ridge regression of item j on the others, e.g. for a:
#   [[4, 1], [1, 2]]^-1 [G_ba, G_ca] = [[2, -1], [-1, 4]] / 7 @ [1, 0] = [2/7, -1/7] (B_ba, B_ca).
HAND_GRAM = np.array([[1, 1, 0], [1, 3, 1], [0, 1, 1]], np.float32)
HAND_B = np.array([[0.0, 1 / 2, -1 / 7], [2 / 7, 0.0, 2 / 7], [-1 / 7, 1 / 2, 0.0]])
HAND_TRAIN = [(1, 1), (1, 2), (2, 2), (2, 3), (3, 2)]  # the three users, items a, b, c = 1, 2, 3


def write_features(root: Path, split_pairs: dict[str, list[tuple[int, int]]], n_items: int, weight: float = 1.0,
                   weights: dict[tuple[int, int], float] | None = None) -> Path:
    """A feature partition with these (user_idx, item_idx) pairs per split and items 1..n_items.

    Every pair weighs ``weight`` but those ``weights`` names.
    """
    weights = weights or {}
    for split, pairs in split_pairs.items():
        directory = root / "interactions" / f"split={split}"
        directory.mkdir(parents=True)
        pq.write_table(pa.table({"user_idx": pa.array([u for u, _ in pairs], pa.int32()),
                                 "item_idx": pa.array([i for _, i in pairs], pa.int32()),
                                 "weight": pa.array([weights.get(pair, weight) for pair in pairs], pa.float64())}),
                       directory / "part.parquet")
    popularity = np.bincount([i for _, i in split_pairs["train"]], minlength=n_items + 1)[1:]
    (root / "item_features").mkdir()
    pq.write_table(pa.table({"item_idx": pa.array(range(1, n_items + 1), pa.int32()),
                             "item_id": [f"i{i}" for i in range(1, n_items + 1)],
                             "year": pa.array([None] * n_items, pa.int32()),
                             "categories": pa.array([[]] * n_items, pa.list_(pa.string())),
                             "popularity": pa.array(popularity, pa.int32())}), root / "item_features" / "part.parquet")
    return root


def user_pairs(user: int, items: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(user, item) for item in items]


# ----------------------------------------------------------------------------- closed form


def test_ease_weights_match_the_hand_worked_3x3():
    np.testing.assert_allclose(ease_weights(HAND_GRAM.copy(), 1.0), HAND_B, atol=1e-6)


def test_ease_weights_have_a_zero_diagonal_and_leave_the_gram_as_it_was():
    rng = np.random.default_rng(0)
    x = (rng.random((40, 12)) < 0.3).astype(np.float32)
    gram = x.T @ x
    before = gram.copy()
    weights = ease_weights(gram, 5.0)
    assert weights.dtype == np.float32
    assert np.all(np.diagonal(weights) == 0.0)  # exactly: an item never predicts itself
    np.testing.assert_array_equal(gram, before)  # the diagonal raised for the solve is restored


def test_ease_weights_reject_a_non_positive_l2():
    with pytest.raises(ValueError, match="l2 must be > 0, got 0.0"):
        ease_weights(HAND_GRAM.copy(), 0.0)


def test_fit_ease_reads_a_binary_matrix_from_the_features(tmp_path):
    # Weight 4 on every pair is ignored (binary X): weighted, G would be 16x and B would differ.
    features = write_features(tmp_path, {"train": HAND_TRAIN, "validation": [], "test": []}, n_items=3, weight=4.0)
    scorer = fit_ease(features, EvalConfig(), l2=1.0)
    assert scorer.l2 == 1.0 and scorer.validation_ndcg == {}
    expected = np.zeros((4, 4))
    expected[1:, 1:] = HAND_B  # padding row and column 0 stay zero
    np.testing.assert_allclose(scorer.item_weights, expected, atol=1e-6)


def test_fit_ease_leaves_disliked_pairs_out_of_the_matrix(tmp_path):
    # User 1 also disliked c (weight < 0): not a liked item, so G and B are the hand-worked ones.
    train = HAND_TRAIN + [(1, 3)]
    features = write_features(tmp_path, {"train": train, "validation": [], "test": []}, n_items=3, weights={(1, 3): -1.0})
    np.testing.assert_allclose(fit_ease(features, EvalConfig(), l2=1.0).item_weights[1:, 1:], HAND_B, atol=1e-6)


# ----------------------------------------------------------------------------- scorer


def test_ease_scorer_sums_the_rows_of_the_liked_history_items():
    weights = np.zeros((4, 4), np.float32)
    weights[1:, 1:] = HAND_B
    scorer = EaseScorer(weights, l2=1.0)
    # Row 0 liked a (1) and c (3): B_a + B_c = [0, 0, 1/2, -1/7] + [0, -1/7, 1/2, 0] = [0, -1/7, 1, -1/7].
    # Row 1 liked b (2) and disliked a (weight < 0, not in x_u): B_b = [0, 2/7, 0, 2/7].
    # Row 2 has no history: zeros.
    history = History(rows=np.array([0, 0, 1, 1]), items=np.array([1, 3, 2, 1]),
                      weights=np.array([1.0, 2.0, 1.0, -1.0], np.float32))
    scores = scorer.score(np.array([5, 6, 7], np.int32), history)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, [[0, -1 / 7, 1, -1 / 7], [0, 2 / 7, 0, 2 / 7], [0, 0, 0, 0]], rtol=1e-6)


def test_ease_scorer_gives_the_same_scores_when_a_history_is_gathered_in_pieces(monkeypatch):
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(6, 6)).astype(np.float32)
    history = History(rows=np.array([0, 0, 0, 1, 1, 2]), items=np.array([1, 2, 5, 3, 4, 5]),
                      weights=np.ones(6, np.float32))
    x = np.zeros((3, 6), np.float32)
    x[history.rows, history.items] = 1.0
    monkeypatch.setattr(ease_module, "_GATHER_FLOATS", 12)  # 12 // 6 items = 2 rows of B per piece
    # Pieces [0, 0], [0, 1], [1, 2]: rows 0 and 1 each span two pieces; still x_u . B.
    np.testing.assert_allclose(EaseScorer(weights, l2=1.0).score(np.arange(3), history), x @ weights, rtol=1e-6)


# ----------------------------------------------------------------------------- l2 on validation

# Items 1..4. Train: users 1..6 below, and user 7 (train {1}) whose validation item is 2.
#   G_1j (co-occurrence with item 1) = 2 for item 2, 3 for item 3, 2 for item 4.
# l2 = 100 is large against G, so B_1j ~ G_1j / l2: item 3 ranks first, item 2 second -> NDCG@10 0.63093.
# l2 = 1: column j of B is the ridge regression of j on the other items; item 3's co-occurrence with 1
#   is mostly explained by item 4 (3 and 4 come together in users 4, 5, 6), so
#   B_1j = 16/57 = 0.281 for item 2, 5/28 = 0.179 for item 3, 1/9 = 0.111 for item 4
#   (np.linalg.solve of each column's ridge system): item 2 first -> NDCG@10 1.
L2_SPLITS = {
    "train": (user_pairs(1, (1,)) + user_pairs(2, (1, 2)) + user_pairs(3, (1, 2, 3)) + user_pairs(4, (1, 3, 4))
              + user_pairs(5, (1, 3, 4)) + user_pairs(6, (3, 4)) + user_pairs(7, (1,))),
    "validation": [(7, 2)],
    "test": [(7, 3)],
}


@pytest.fixture
def l2_features(tmp_path: Path) -> Path:
    return write_features(tmp_path, L2_SPLITS, n_items=4)


def test_fit_ease_chooses_l2_by_validation_ndcg(l2_features):
    scorer = fit_ease(l2_features, EvalConfig(ease_l2_grid=(100.0, 1.0)))
    assert scorer.l2 == 1.0  # the second grid value: chosen by its score, not its place
    assert scorer.validation_ndcg == pytest.approx({100.0: D2, 1.0: 1.0})


def test_fit_ease_breaks_a_validation_tie_by_the_earlier_grid_value(l2_features):
    # l2 = 1 and 2 both rank item 2 first (B_1j = 0.244, 0.210, 0.118 at l2 = 2): NDCG@10 1 each.
    scorer = fit_ease(l2_features, EvalConfig(ease_l2_grid=(2.0, 1.0)))
    assert scorer.validation_ndcg == pytest.approx({2.0: 1.0, 1.0: 1.0})
    assert scorer.l2 == 2.0


def test_fit_ease_refits_on_the_given_splits_with_the_chosen_l2(l2_features):
    scorer = fit_ease(l2_features, EvalConfig(ease_l2_grid=(100.0, 1.0)), splits=("train", "validation"))
    assert scorer.l2 == 1.0
    # User 7's validation pair (7, 2) now counts (G_12 = 3, G_22 = 3): B_12 = 9/19 = 0.474 instead of 16/57
    # (np.linalg.solve of item 2's ridge system with l2 = 1).
    np.testing.assert_allclose(scorer.item_weights[1, 2], 9 / 19, rtol=1e-5)


# ----------------------------------------------------------------------------- item limit


def test_ease_skip_reason_names_the_limit_and_the_memory():
    cfg = EvalConfig(ease_max_items=20_000)
    assert ease_skip_reason(20_000, cfg) is None
    # 30,001 x 30,001 float32 = 4 * 30,001^2 bytes = 3.6 GB.
    assert ease_skip_reason(30_000, cfg) == (
        "30,000 items > evaluate.ease_max_items 20,000: one items x items float32 matrix would take 3.6 GB"
    )


def test_fit_ease_is_skipped_above_ease_max_items(l2_features, caplog):
    assert fit_ease(l2_features, EvalConfig(ease_max_items=3)) is None  # 4 items
    assert "ease: skipped, 4 items > evaluate.ease_max_items 3" in caplog.text


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ease_max_items": 0}, "evaluate.ease_max_items must be >= 1, got 0"),
        ({"ease_l2_grid": ()}, "evaluate.ease_l2_grid must hold at least one value"),
        ({"ease_l2_grid": (50.0, 0.0)}, r"evaluate.ease_l2_grid values must be finite numbers > 0, got \[50.0, 0.0\]"),
        ({"ease_l2_grid": (-1.0,)}, "evaluate.ease_l2_grid values must be finite numbers > 0"),
        ({"ease_l2_grid": (float("nan"),)}, "evaluate.ease_l2_grid values must be finite numbers > 0"),
        ({"ease_l2_grid": (float("inf"),)}, "evaluate.ease_l2_grid values must be finite numbers > 0"),
    ],
)
def test_eval_config_rejects_bad_ease_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig(**settings)


def test_eval_config_keeps_the_ease_l2_grid_as_floats():
    assert EvalConfig(ease_l2_grid=[10, 20]).ease_l2_grid == (10.0, 20.0)


# ----------------------------------------------------------------------------- against popularity


@pytest.fixture
def clustered_features(tmp_path: Path) -> Path:
    """6 groups of 10 items; each user takes 8 items of one group: 6 train, 1 validation, 1 test.

    Group 0 draws half the users, so popularity ranks its items first for everyone.
    """
    rng = np.random.default_rng(7)
    splits: dict[str, list[tuple[int, int]]] = {"train": [], "validation": [], "test": []}
    for user in range(1, 301):
        group = rng.choice(6, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
        items = 1 + 10 * group + rng.permutation(10)[:8]
        splits["train"] += user_pairs(user, tuple(items[:6]))
        splits["validation"].append((user, int(items[6])))
        splits["test"].append((user, int(items[7])))
    return write_features(tmp_path, splits, n_items=60)


def test_ease_beats_most_popular_when_items_co_occur(clustered_features):
    cfg = EvalConfig(ease_l2_grid=(1.0, 10.0))
    ease = evaluate_scorer(fit_ease(clustered_features, cfg), clustered_features, "test", cfg)
    popular = evaluate_scorer(MostPopularScorer(load_item_table(clustered_features).popularity), clustered_features, "test", cfg)
    # Each user's test item is one of the 3 group items left after 7 seen: in EASE's top 10 almost always;
    # popularity's top 10 is group 0's, a hit for half the users at most.
    assert ease["recall@10"] > 0.9
    assert popular["recall@10"] < 0.6
    assert ease["ndcg@10"] > 1.5 * popular["ndcg@10"]
