"""Causal histories: each train pair sees only the items its user touched before it.

The interactions are ``tests.helpers.PAIRS``: user 1 touched item 2, then 7 and 9 on one day
(tie: item order), then 5, and their validation item 8 comes last; user 2 item 4, then 3.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import ServingConfig, load_config
from pipeline.data.features import load_sequences, load_train_sequences, with_history_before_test
from pipeline.modeling.models import build_model, export_retrieval
from pipeline.modeling.training import interaction_dataset
from tests.helpers import ITEMS, TINY_TOWER, USERS, write_interactions


def test_each_train_pair_sees_only_what_came_before_it(tmp_path):
    write_interactions(tmp_path)
    sequences = load_train_sequences(tmp_path, n_items=10)
    users = np.array([1, 1, 1, 1, 2, 2], np.int32)
    items = np.array([2, 7, 9, 5, 4, 3], np.int32)
    # User 1's order: 2, 7, 9 (7 before 9 on the same day), 5. Two slots, oldest first, 0-padded on the left.
    expected = [[0, 0], [0, 2], [2, 7], [7, 9], [0, 0], [0, 4]]
    np.testing.assert_array_equal(sequences.histories(users, items, 2), expected)
    np.testing.assert_array_equal(sequences.histories(np.array([1], np.int32), np.array([5], np.int32), 4), [[0, 2, 7, 9]])


def test_a_pair_outside_the_train_split_is_named(tmp_path):
    write_interactions(tmp_path)
    sequences = load_train_sequences(tmp_path, n_items=10)
    with pytest.raises(KeyError, match=r"1 pairs are not train interactions, e\.g\. \(user_idx, item_idx\)=\(1, 8\)"):
        sequences.histories(np.array([1, 1], np.int32), np.array([2, 8], np.int32), 2)


def test_the_training_stream_carries_each_pairs_history(tmp_path):
    write_interactions(tmp_path)
    sequences = load_train_sequences(tmp_path, n_items=10)
    batches = list(interaction_dataset(tmp_path, "train", batch_size=16, shuffle_buffer=16, seed=1,
                                       sequences=sequences, history_length=3))
    rows = {(int(u), int(i)): list(h) for b in batches
            for u, i, h in zip(b["user_idx"].numpy(), b["item_idx"].numpy(), b["history"].numpy())}
    assert rows == {(1, 2): [0, 0, 0], (1, 7): [0, 0, 2], (1, 9): [0, 2, 7], (1, 5): [2, 7, 9],
                    (2, 4): [0, 0, 0], (2, 3): [0, 0, 4]}


def test_the_refit_stream_holds_train_and_validation_with_histories_across_them(tmp_path):
    write_interactions(tmp_path)
    both = ("train", "validation")
    batches = list(interaction_dataset(tmp_path, both, batch_size=16, shuffle_buffer=16, seed=1,
                                       sequences=load_sequences(tmp_path, 10, both), history_length=3))
    rows = {(int(u), int(i)): list(h) for b in batches
            for u, i, h in zip(b["user_idx"].numpy(), b["item_idx"].numpy(), b["history"].numpy())}
    # User 1's validation item 8 comes after 2, 7, 9, 5: its history is the last three train items.
    assert rows == {(1, 2): [0, 0, 0], (1, 7): [0, 0, 2], (1, 9): [0, 2, 7], (1, 5): [2, 7, 9], (1, 8): [7, 9, 5],
                    (2, 4): [0, 0, 0], (2, 3): [0, 0, 4]}


def test_the_hard_loss_embeds_the_given_history_not_the_stored_one():
    tf.keras.utils.set_random_seed(3)
    training = load_config().training
    model = build_model(USERS, ITEMS, TINY_TOWER, training, "m")
    user, given = tf.constant([2], tf.int32), tf.constant([[0, 1]], tf.int32)  # stored history: [2, 3]
    stored_vec = model.query.embed(user)[0].numpy()
    given_vec = model.query.embed(user, history=given)[0].numpy()
    assert not np.allclose(stored_vec, given_vec)
    items = model.candidate(tf.constant([1, 2, 3])).numpy()

    def cross_entropy(user_vec):  # true item 1 -> column 0 of the real items
        logits = user_vec @ items.T / training.retrieval_temperature
        return float(np.log(np.exp(logits).sum()) - logits[0, 0])

    batch = {"user_idx": user, "item_idx": tf.constant([1], tf.int32)}
    assert float(model.hard_loss({**batch, "history": given})) == pytest.approx(cross_entropy(given_vec), rel=1e-5, abs=1e-5)
    assert float(model.hard_loss(batch)) == pytest.approx(cross_entropy(stored_vec), rel=1e-5, abs=1e-5)


def test_the_latest_history_and_the_history_before_test(tmp_path):
    write_interactions(tmp_path)
    # Train only: user 1's 2, 7, 9, 5 -> last three 7, 9, 5; user 2: 4, 3. Row 0 (padding) and row 3 (no pairs) stay empty.
    np.testing.assert_array_equal(load_train_sequences(tmp_path, 10).latest(4, 3), [[0, 0, 0], [7, 9, 5], [0, 4, 3], [0, 0, 0]])
    # Train + validation: user 1's validation item 8 comes last.
    both = load_sequences(tmp_path, 10, ("train", "validation"))
    np.testing.assert_array_equal(both.latest(3, 3), [[0, 0, 0], [9, 5, 8], [0, 4, 3]])
    users = with_history_before_test(tmp_path, USERS, 10)
    np.testing.assert_array_equal(users.history, [[0, 0], [5, 8], [4, 3]])
    np.testing.assert_array_equal(users.user_ids, USERS.user_ids)


def test_the_export_serves_the_history_it_is_given(tmp_path):
    tf.keras.utils.set_random_seed(3)
    model = build_model(USERS, ITEMS, TINY_TOWER, load_config().training, "m")
    served = np.array([[0, 0], [0, 0], [0, 1]], np.int32)  # user "b" now has history [0, 1] (stored: [2, 3])
    export_retrieval(model, dataclasses_replace_history(USERS, served), ITEMS, tmp_path / "sm", ServingConfig(top_k=2))
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    want = model.query.embed(tf.constant([2]), history=tf.constant([[0, 1]]))[0].numpy()
    np.testing.assert_allclose(loaded.query_model(tf.constant(["b"])).numpy(), want, rtol=1e-5)
    np.testing.assert_array_equal(model.query.history.numpy(), USERS.history)  # the trained model keeps its own


def dataclasses_replace_history(users, history):
    import dataclasses

    return dataclasses.replace(users, history=history)
