"""The pieces of the batch soft targets: partial top-k, user streaming and batching, engine settings.

Both engines writing the same targets for a real teacher is tested in
``test_distillation_pipeline.py`` (it needs the trained chain).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, SoftTargetConfig, load_config
from pipeline.data.features import count_users_with_interactions, stream_user_items
from pipeline.soft_targets.teacher_scoring import top_k_excluding, user_batches


def full_sort_top_k(scores, exclude, k):
    """The specification: mask, stable sort of every column best first, cut at k (the former code)."""
    scores = scores.astype(np.float32, copy=True)
    scores[:, 0] = -np.inf
    for row, items in enumerate(exclude):
        scores[row, items] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order.astype(np.int32), np.take_along_axis(scores, order, axis=1)


def test_top_k_breaks_ties_by_lower_index_and_masks_column_0_and_known_items():
    scores = np.array([
        [0.875, 0.5, 0.75, 0.5, 0.5, 0.125],    # col 0 and known col 2 masked: 0.5 at cols 1, 3, 4, then 0.125
        [0.375, 0.25, 0.875, 0.625, 0.25, 0.625],  # known col 3 masked: 0.875 (2), 0.625 (5), 0.25 at cols 1 and 4
    ], np.float32)
    idx, top = top_k_excluding(scores, [np.array([2]), np.array([3])], k=3)
    np.testing.assert_array_equal(idx, [[1, 3, 4], [2, 5, 1]])
    np.testing.assert_array_equal(top, [[0.5, 0.5, 0.5], [0.875, 0.625, 0.25]])
    # k=2 cuts inside the ties: the lower indices keep their places (row 0: 1 and 3, not 4).
    idx, top = top_k_excluding(scores, [np.array([2]), np.array([3])], k=2)
    np.testing.assert_array_equal(idx, [[1, 3], [2, 5]])
    np.testing.assert_array_equal(top, [[0.5, 0.5], [0.875, 0.625]])


def test_top_k_fills_with_masked_columns_in_index_order_when_too_few_remain():
    # Cols 0 and 2 masked leave only col 1 (0.25); the second place goes to the lowest masked column, 0.
    idx, top = top_k_excluding(np.array([[0.375, 0.25, 0.875]], np.float32), [np.array([2])], k=2)
    np.testing.assert_array_equal(idx, [[1, 0]])
    np.testing.assert_array_equal(top, [[0.25, -np.inf]])


@pytest.mark.parametrize("k", [1, 5, 30, 49])
def test_top_k_equals_the_full_stable_sort_on_tie_heavy_scores(k):
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 4, size=(20, 50)).astype(np.float32)  # 4 values over 50 columns: ties everywhere
    exclude = [rng.choice(np.arange(1, 50), size=rng.integers(0, 40), replace=False) for _ in range(20)]
    idx, top = top_k_excluding(scores, exclude, k)
    want_idx, want_top = full_sort_top_k(scores, exclude, k)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(top, want_top)
    assert idx.dtype == np.int32 and top.dtype == np.float32


def test_top_k_rejects_nan_scores():
    with pytest.raises(ValueError, match="1 teacher score\\(s\\) are NaN"):
        top_k_excluding(np.array([[0.0, np.nan, 1.0]], np.float32), [np.array([], np.int32)], k=1)


def test_user_batches_are_consecutive_users_whatever_the_chunks():
    items = {u: np.array([u * 10]) for u in (1, 2, 3, 5, 8, 9)}
    chunks = [(np.array([1, 2, 3]), [items[1], items[2], items[3]]), (np.array([5]), [items[5]]),
              (np.array([8, 9]), [items[8], items[9]])]
    batches = list(user_batches(chunks, 2))
    assert [b.tolist() for b, _ in batches] == [[1, 2], [3, 5], [8, 9]]
    assert [[int(i[0]) for i in known] for _, known in batches] == [[10, 20], [30, 50], [80, 90]]
    assert [b.tolist() for b, _ in user_batches(chunks, 4)] == [[1, 2, 3, 5], [8, 9]]
    assert list(user_batches([], 4)) == []


@pytest.fixture
def features(tmp_path):
    """Interactions train (3,5) (1,2) (3,1) (2,7), validation (1,4), test (4,6); user_features counts to match."""
    for split, pairs in {"train": [(3, 5), (1, 2), (3, 1), (2, 7)], "validation": [(1, 4)], "test": [(4, 6)]}.items():
        (tmp_path / "interactions" / f"split={split}").mkdir(parents=True)
        users, items = zip(*pairs)
        pq.write_table(pa.table({"user_idx": pa.array(users, pa.int32()), "item_idx": pa.array(items, pa.int32()),
                                 "weight": pa.array([1.0] * len(pairs), pa.float32())}),
                       tmp_path / "interactions" / f"split={split}" / "part-0.parquet")
    (tmp_path / "user_features").mkdir()
    pq.write_table(pa.table({"user_idx": [1, 2, 3, 4], "n_train": [1, 1, 2, 0], "n_validation": [1, 0, 0, 0],
                             "n_test": [0, 0, 0, 1]}), tmp_path / "user_features" / "part-0.parquet")
    return tmp_path


def test_stream_user_items_groups_pairs_by_user_in_order_through_spill_ranges(features, tmp_path):
    # 4 train pairs, 2 per chunk: 2 ranges of width ceil(5 users / 2) = 3, user_idx 0-2 and 3-5.
    chunks = list(stream_user_items(features, ["train"], 5, tmp_path / "spill", pairs_per_chunk=2))
    assert [users.tolist() for users, _ in chunks] == [[1, 2], [3]]
    assert [[sorted(i.tolist()) for i in items] for _, items in chunks] == [[[2], [7]], [[1, 5]]]
    assert list((tmp_path / "spill").iterdir()) == []  # each spill file goes once read
    (users, items), = stream_user_items(features, ["train", "validation"], 5, tmp_path / "spill2", pairs_per_chunk=100)
    assert users.tolist() == [1, 2, 3] and [sorted(i.tolist()) for i in items] == [[2, 4], [7], [1, 5]]


def test_count_users_with_interactions_reads_the_per_split_counts(features):
    assert count_users_with_interactions(features, ["train"]) == 3
    assert count_users_with_interactions(features, ["train", "validation"]) == 3
    assert count_users_with_interactions(features, ["test"]) == 1


def test_engine_follows_spark_master_then_spark_min_users():
    assert SoftTargetConfig().engine(1_999_999) == "numpy" and SoftTargetConfig().engine(2_000_000) == "spark"
    assert SoftTargetConfig(spark_min_users=10).engine(9) == "numpy"
    assert SoftTargetConfig(spark_master="spark://host:7077").engine(1) == "spark"


@pytest.mark.parametrize("setting, message", [
    ({"pairs_per_chunk": 0}, "soft_targets.pairs_per_chunk must be >= 1"),
    ({"spark_min_users": 0}, "soft_targets.spark_min_users must be >= 1"),
    ({"spark_master": ""}, "soft_targets.spark_master must be a master URL or null, got ''"),
    ({"spark_master": 7077}, "soft_targets.spark_master must be a master URL or null, got 7077"),
])
def test_bad_engine_settings_are_rejected_by_name(setting, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(")):
        load_config({"soft_targets": setting})
