"""Warm start: last night's rows matched to tonight's vocabularies by id."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.modeling.models import build_model
from pipeline.modeling.warm_start import _build, remap_rows, transfer_weights
from tests.helpers import ITEMS, TINY_TOWER, USERS


def test_a_known_id_keeps_its_row_a_new_one_stays_fresh_a_vanished_one_is_gone():
    previous = np.array([[0, 0], [1, 1], [2, 2]], np.float32)  # rows: padding, "a", "b"
    fresh = np.array([[9, 9], [8, 8], [7, 7]], np.float32)  # tonight: padding, "b", "c"
    table, counts = remap_rows(previous, ["", "a", "b"], fresh, ["", "b", "c"])
    # "b" moves from row 2 to row 1; "c" keeps its fresh row; "a" is dropped; padding stays fresh.
    np.testing.assert_array_equal(table, [[9, 9], [2, 2], [7, 7]])
    assert counts == {"kept": 1, "new": 1, "dropped": 1}
    np.testing.assert_array_equal(fresh, [[9, 9], [8, 8], [7, 7]])  # the input is not changed


def test_tables_of_other_widths_are_refused():
    with pytest.raises(ValueError, match="embedding widths differ: 2 last night, 3 tonight"):
        remap_rows(np.zeros((2, 2)), ["", "a"], np.zeros((2, 3)), ["", "a"])


def test_a_model_is_warm_started_row_by_id_and_weight_by_weight():
    training = load_config().training
    previous = build_model(USERS, ITEMS, TINY_TOWER, training, "previous")
    # Tonight: user "a" is gone, "c" is new (and "b" moved from row 2 to row 1); item "y" is gone, "w" new.
    tonight_users = dataclasses.replace(USERS, user_ids=np.array(["", "b", "c"], dtype=object))
    tonight_items = dataclasses.replace(ITEMS, item_ids=np.array(["", "x", "w", "z"], dtype=object))
    model = build_model(tonight_users, tonight_items, TINY_TOWER, training, "tonight")
    counts = transfer_weights(previous, {"users": USERS.user_ids, "items": ITEMS.item_ids}, model,
                              {"users": tonight_users.user_ids, "items": tonight_items.item_ids})
    assert counts["users"] == {"kept": 1, "new": 1, "dropped": 1}
    assert counts["items"] == {"kept": 2, "new": 1, "dropped": 1}
    old_users, new_users = previous.query.user_embedding.embeddings.numpy(), model.query.user_embedding.embeddings.numpy()
    np.testing.assert_array_equal(new_users[1], old_users[2])  # "b"
    assert not np.array_equal(new_users[2], old_users[1])  # "c" is not "a"'s old row
    old_items, new_items = previous.candidate.item_embedding.embeddings.numpy(), model.candidate.item_embedding.embeddings.numpy()
    np.testing.assert_array_equal(new_items[[1, 3]], old_items[[1, 3]])  # "x" and "z" stay where they were
    # Every other weight (side embeddings, dense layers) is copied whole: same architecture.
    assert counts["fresh"] == [] and counts["copied"] == len(model.trainable_variables) - 3
    np.testing.assert_array_equal(model.query.mlp.output_layer.kernel.numpy(), previous.query.mlp.output_layer.kernel.numpy())


def test_keep_shrinks_each_copied_row_towards_its_fresh_value_and_leaves_new_rows_fresh():
    previous = np.array([[0, 0], [1, 1], [2, 2]], np.float32)  # rows: padding, "a", "b"
    fresh = np.array([[9, 9], [8, 8], [7, 7]], np.float32)  # tonight: padding, "b", "c"
    table, _ = remap_rows(previous, ["", "a", "b"], fresh, ["", "b", "c"], keep=0.75)
    np.testing.assert_allclose(table, [[9, 9], [0.75 * 2 + 0.25 * 8] * 2, [7, 7]])


def test_keep_blends_every_copied_weight_with_tonights_fresh_one():
    training = load_config().training
    previous = build_model(USERS, ITEMS, TINY_TOWER, training, "previous")
    model = build_model(USERS, ITEMS, TINY_TOWER, training, "tonight")
    _build(model)
    fresh_kernel, fresh_items = model.query.mlp.output_layer.kernel.numpy(), model.candidate.item_embedding.embeddings.numpy()
    transfer_weights(previous, {"users": USERS.user_ids, "items": ITEMS.item_ids}, model,
                     {"users": USERS.user_ids, "items": ITEMS.item_ids}, keep=0.5)
    old_kernel, old_items = previous.query.mlp.output_layer.kernel.numpy(), previous.candidate.item_embedding.embeddings.numpy()
    assert not np.allclose(old_kernel, fresh_kernel)
    np.testing.assert_allclose(model.query.mlp.output_layer.kernel.numpy(), 0.5 * old_kernel + 0.5 * fresh_kernel, rtol=1e-6)
    np.testing.assert_allclose(model.candidate.item_embedding.embeddings.numpy()[1:], 0.5 * old_items[1:] + 0.5 * fresh_items[1:],
                               rtol=1e-6)
