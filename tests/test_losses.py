"""Distillation losses on numbers worked out by hand."""

import math

import pytest
import tensorflow as tf

from pipeline.modeling.losses import SoftTargetLoss, hint_loss


def test_kl_of_identical_distributions_is_zero():
    logits = tf.constant([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])
    assert float(SoftTargetLoss(distill_temperature=3.0)(logits, logits)) == pytest.approx(0.0, abs=1e-6)


def test_temperature_squared_factor():
    # T=2: p = softmax([0, 0] / 2) = [1/2, 1/2]; q = softmax([0, 2 ln 3] / 2) = softmax([0, ln 3]) = [1/4, 3/4].
    # KL(p || q) = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.143841; times T^2 = 4 -> 0.575364.
    teacher = tf.constant([[0.0, 0.0]])
    student = tf.constant([[0.0, 2.0 * math.log(3.0)]])
    kl = 0.5 * math.log(4.0 / 3.0)
    assert float(SoftTargetLoss(distill_temperature=2.0)(teacher, student)) == pytest.approx(4.0 * kl, rel=1e-5)
    # The same distributions at T=1 (logits halved) carry no T^2 factor.
    assert float(SoftTargetLoss(distill_temperature=1.0)(teacher, student / 2.0)) == pytest.approx(kl, rel=1e-5)


def test_ranking_target_weights_positions_and_ignores_negatives():
    # top_k=2, decay=1: weights [1, e^-1, 0] / (1 + e^-1) = [0.731059, 0.268941, 0].
    loss = SoftTargetLoss(distill_temperature=1.0, mode="ranking", top_k=2, decay=1.0)
    target = loss.target(tf.zeros([1, 3])).numpy()[0]
    assert target.tolist() == pytest.approx([0.731059, 0.268941, 0.0], abs=1e-6)
    # A student already matching the target costs nothing: logits = log(target) (+ constant).
    student = tf.math.log(tf.constant([[0.731059, 0.268941, 1e-12]]))
    assert float(loss(tf.zeros([1, 3]), student)) == pytest.approx(0.0, abs=1e-5)


def test_hint_loss_is_mean_squared_error():
    # ((1 - 0)^2 + (2 - 0)^2 + (3 - 3)^2 + (5 - 4)^2) / 4 = 6 / 4 = 1.5
    assert float(hint_loss(tf.constant([[1.0, 2.0], [3.0, 5.0]]), tf.constant([[0.0, 0.0], [3.0, 4.0]]))) == pytest.approx(1.5)


@pytest.mark.parametrize("kwargs, message", [({"distill_temperature": 0}, "distill_temperature"), ({"mode": "listwise"}, "mode")])
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SoftTargetLoss(**kwargs)
