"""The teacher's soft targets read by row from a memory-mapped copy, and carried by the training stream."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from pipeline.modeling.training import interaction_dataset
from pipeline.soft_targets.rows import MissingSoftTargets, UserSoftTargets, read_teacher_items
from tests.helpers import write_interactions

K, D = 3, 2


def _fixed_list(matrix: np.ndarray, dtype: pa.DataType) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), type=dtype), matrix.shape[1])


def write_soft_targets(root, users=(1, 2, 4, 6)):
    """User ``u``'s top-K is ``[10u, 10u + 1, 10u + 2]`` and its embedding ``[u + 0.5, -u]``; item
    ``i`` (1..3) has embedding ``[i, 2i]``."""
    users = np.array(users, np.int32)
    topk = 10 * users[:, None] + np.arange(K, dtype=np.int32)
    embedding = np.stack([users + 0.5, -users], axis=1).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "user_idx": pa.array(users), "user_id": pa.array([f"u{u}" for u in users]),
        "topk_item_idx": _fixed_list(topk, pa.int32()), "topk_scores": _fixed_list(-topk.astype(np.float32), pa.float32()),
        "teacher_user_embedding": _fixed_list(embedding, pa.float32()),
    }), root / "users.parquet", row_group_size=3)
    item_idx = np.array([1, 2, 3], np.int32)
    pq.write_table(pa.table({
        "item_idx": pa.array(item_idx), "item_id": pa.array(["a", "b", "c"]),
        "teacher_item_embedding": _fixed_list(np.stack([item_idx, 2 * item_idx], axis=1).astype(np.float32), pa.float32()),
    }), root / "items.parquet")
    (root / "manifest.json").write_text(json.dumps({"ds": "2024-01-31", "teacher_version": "t1", "k": K, "dim": D, "logit_scale": 2.0,
                                                    "users": int(users.size), "items": 3}))
    return root


def test_lookup_returns_the_rows_of_the_given_users_in_their_order(tmp_path):
    # Copied two rows at a time: the copy spans several record batches.
    lookup = UserSoftTargets(write_soft_targets(tmp_path / "soft"), tmp_path, batch_rows=2)
    rows = lookup(np.array([6, 1, 6, 4], np.int32))  # unsorted, with a repeat
    assert rows["teacher_topk"].dtype == np.int32 and rows["teacher_user"].dtype == np.float32
    np.testing.assert_array_equal(rows["teacher_topk"], [[60, 61, 62], [10, 11, 12], [60, 61, 62], [40, 41, 42]])
    np.testing.assert_array_equal(rows["teacher_user"], [[6.5, -6.0], [1.5, -1.0], [6.5, -6.0], [4.5, -4.0]])
    assert lookup.specs == {"teacher_topk": tf.TensorSpec([None, K], tf.int32), "teacher_user": tf.TensorSpec([None, D], tf.float32)}


def test_users_without_soft_targets_are_named(tmp_path):
    lookup = UserSoftTargets(write_soft_targets(tmp_path / "soft"), tmp_path)
    # 0 sorts before the first user, 5 between two, 7 after the last.
    with pytest.raises(MissingSoftTargets, match=r"no soft targets for user_idx \[0, 5, 7\] \(3 users\)"):
        lookup(np.array([4, 7, 0, 5, 7], np.int32))


def test_unsorted_user_rows_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="user_idx must be strictly increasing"):
        UserSoftTargets(write_soft_targets(tmp_path / "soft", users=(1, 4, 2)), tmp_path)


def test_teacher_items_are_indexed_by_item_idx(tmp_path):
    items = read_teacher_items(write_soft_targets(tmp_path / "soft"), num_items=5)
    # Padding 0 and item 4 have no row: zeros.
    np.testing.assert_array_equal(items.embedding, [[0, 0], [1, 2], [2, 4], [3, 6], [0, 0]])
    assert (items.logit_scale, items.top_k) == (2.0, K)


def test_the_training_stream_carries_each_pairs_user_targets(tmp_path):
    write_interactions(tmp_path)  # train pairs of users 1 and 2
    lookup = UserSoftTargets(write_soft_targets(tmp_path / "soft"), tmp_path)
    batches = list(interaction_dataset(tmp_path, "train", batch_size=4, shuffle_buffer=16, seed=1, user_columns=lookup))
    pairs = [(int(u), list(t), list(e)) for b in batches
             for u, t, e in zip(b["user_idx"].numpy(), b["teacher_topk"].numpy(), b["teacher_user"].numpy())]
    assert len(pairs) == 6
    assert all(t == [10 * u, 10 * u + 1, 10 * u + 2] and e == [u + 0.5, -u] for u, t, e in pairs)


def test_the_training_stream_fails_on_a_user_without_targets(tmp_path):
    write_interactions(tmp_path)
    lookup = UserSoftTargets(write_soft_targets(tmp_path / "soft", users=(1, 4)), tmp_path)
    with pytest.raises(tf.errors.OpError, match=r"no soft targets for user_idx \[2\]"):
        list(interaction_dataset(tmp_path, "train", batch_size=4, shuffle_buffer=16, seed=1, user_columns=lookup))
