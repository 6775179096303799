"""Model sizes worked out by hand, and the student budget."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import ConfigError, ServingConfig, TowerConfig, load_config
from pipeline.data.features import UserTable
from pipeline.modeling.models import absent_token, build_model, build_student, count_tower_params, export_retrieval, size_student
from tests.helpers import ITEMS, TINY_TOWER, USERS



def built_params(tower: TowerConfig) -> int:
    model = build_model(USERS, ITEMS, tower, load_config().training, "m")
    model.query(tf.constant([1])), model.candidate(tf.constant([1]))
    return sum(v.shape.num_elements() for v in model.trainable_variables)


def test_tower_params_by_hand():
    # Query: (3 users + 4 items) x 2 = 14 id/history weights; side rows (2 + 2 + 3) x 1 = 7;
    #   MLP 7 inputs (2*2 + 3*1) -> 3 -> 2: 8*3 + 4*2 = 32.                        -> 53
    # Candidate: 4 items x 2 = 8; side rows (2 years + 3 categories) x 1 = 5;
    #   MLP 4 inputs (2 + 2*1) -> 3 -> 2: 5*3 + 4*2 = 23.                          -> 36
    assert count_tower_params(USERS, ITEMS, TINY_TOWER) == 53 + 36 == built_params(TINY_TOWER)
    wide = dataclasses.replace(TINY_TOWER, embedding_dim=5, side_dim=2, hidden_units=(4, 3))
    assert count_tower_params(USERS, ITEMS, wide) == built_params(wide)


def test_student_shrinks_its_embedding_to_fit_the_budget():
    cfg = load_config({"teacher": {"embedding_dim": 8, "side_dim": 1, "hidden_units": [3], "output_dim": 2},
                       "student": {"embedding_dim": 8, "side_dim": 1, "hidden_units": [3], "output_dim": 2, "max_param_share": 0.5}})
    teacher = count_tower_params(USERS, ITEMS, cfg.teacher)
    sized = size_student(USERS, ITEMS, cfg)
    assert sized.embedding_dim < 8
    assert count_tower_params(USERS, ITEMS, sized) <= 0.5 * teacher
    assert count_tower_params(USERS, ITEMS, dataclasses.replace(sized, embedding_dim=sized.embedding_dim + 1)) > 0.5 * teacher
    model = build_student(USERS, ITEMS, cfg)
    model.query(tf.constant([1])), model.candidate(tf.constant([1]))
    assert sum(v.shape.num_elements() for v in model.trainable_variables) == count_tower_params(USERS, ITEMS, sized)
    # No budget: the configured architecture as it is.
    unbudgeted = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, max_param_share=None))
    assert size_student(USERS, ITEMS, unbudgeted) == unbudgeted.student


def test_an_impossible_budget_is_a_configuration_error():
    cfg = load_config({"student": {"max_param_share": 0.0001}})
    with pytest.raises(ConfigError, match=r"student.max_param_share=0.0001 allows .* parameters, but the smallest student"):
        size_student(USERS, ITEMS, cfg)
    with pytest.raises(ConfigError, match=r"max_param_share must be in \(0, 1\]"):
        load_config({"student": {"max_param_share": 1.5}})


def test_full_catalogue_hard_loss_is_the_mean_softmax_cross_entropy_over_every_real_item():
    training = load_config({"training": {"full_softmax_max_items": 10}}).training
    model = build_model(USERS, ITEMS, TINY_TOWER, training, "m")
    assert model.catalogue is not None
    batch = {"user_idx": tf.constant([1, 2], tf.int32), "item_idx": tf.constant([3, 1], tf.int32)}
    users = model.query(batch["user_idx"]).numpy()
    items = model.candidate(tf.constant([1, 2, 3])).numpy()  # real items only: padding 0 is never a candidate
    logits = users @ items.T / training.retrieval_temperature
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -(log_softmax[0, 2] + log_softmax[1, 0]) / 2  # item 3 -> column 2, item 1 -> column 0
    assert float(model.hard_loss(batch)) == pytest.approx(expected, rel=1e-5, abs=1e-5)  # float32 log-sum-exp
    # Above the threshold: the in-batch softmax of tfrs.tasks.Retrieval.
    assert build_model(USERS, ITEMS, TINY_TOWER, dataclasses.replace(training, full_softmax_max_items=2), "m").catalogue is None


# Ids sorted as the feature job numbers them: "[UNK]" (StringLookup's default OOV token) sorts
# before "[UNK]#" and "a" ('[' is 0x5B, 'a' 0x61), so it would be the vocabulary's first entry.
OOV_USERS = UserTable(user_ids=np.array(["", "[UNK]", "[UNK]#", "a"], dtype=object),
                      history=np.array([[0, 0], [0, 1], [2, 3], [0, 2]], np.int32),
                      age_bucket=np.array([0, 1, 1, 0], np.int32), gender=np.array([0, 1, 0, 1], np.int32),
                      occupation=np.array([0, 1, 2, 0], np.int32))
OOV_ITEMS = dataclasses.replace(ITEMS, item_ids=np.array(["", "[UNK]", "x", "y"], dtype=object))


@pytest.mark.parametrize("index", ["brute_force", "ivf"])
def test_ids_equal_to_the_oov_token_keep_their_own_rows_in_the_export(tmp_path, index):
    assert absent_token(list(OOV_USERS.user_ids[1:])) == "[UNK]##"  # "[UNK]" and "[UNK]#" are real ids
    tf.keras.utils.set_random_seed(5)
    model = build_model(OOV_USERS, OOV_ITEMS, TINY_TOWER, load_config().training, "m")
    serving = ServingConfig(top_k=3, index=index, num_partitions=1, probe_partitions=1)
    export_retrieval(model, OOV_USERS, OOV_ITEMS, tmp_path / "sm", serving)
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    # Every real id gets its own row (1, 2, 3); an unknown id gets the padding row 0.
    ids = tf.constant(["[UNK]", "[UNK]#", "a", "nobody"])
    want = model.query(tf.constant([1, 2, 3, 0])).numpy()
    np.testing.assert_allclose(loaded.query_model(ids).numpy(), want, rtol=1e-5, atol=1e-6)
    # The index returns item ids as they are, "[UNK]" included, ranked by the same scores.
    item_vectors = model.candidate(tf.constant([1, 2, 3])).numpy()
    scores, returned = loaded(ids)
    for row, user_vector in enumerate(want):
        expected = user_vector @ item_vectors.T  # [3] scores of "[UNK]", "x", "y"
        order = np.argsort(-expected, kind="stable")
        np.testing.assert_allclose(scores.numpy()[row], expected[order], rtol=1e-5, atol=1e-6)
        assert [i.decode() for i in returned.numpy()[row]] == list(OOV_ITEMS.item_ids[1:][order])
