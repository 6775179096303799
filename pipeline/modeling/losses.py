"""Distillation losses as small, testable pieces.

Shapes: ``[batch, num_candidates]`` logits, where each row is one user's candidate list
(the teacher's top-K in rank order, then sampled negatives).
"""

from __future__ import annotations

import tensorflow as tf


class SoftTargetLoss:
    """``T^2 * KL(target || softmax(student / T))``, averaged over the batch.

    The target is either the softened teacher distribution ``softmax(teacher / T)``
    (Hinton et al.) or, for ``mode="ranking"``, position weights on the teacher's top-K
    (``w_k ~ exp(-k / decay)``, zero on the sampled negatives; Ranking Distillation).

    Args:
        distill_temperature: T > 0; higher spreads probability over more candidates.
        mode: ``"kl"`` or ``"ranking"``.
        top_k: How many leading candidates are the teacher's top-K (ranking mode).
        decay: Position-weight decay (ranking mode).
    """

    def __init__(self, distill_temperature: float = 2.0, mode: str = "kl", top_k: int = 100, decay: float = 10.0):
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {distill_temperature}")
        if mode not in ("kl", "ranking"):
            raise ValueError(f"mode must be 'kl' or 'ranking', got {mode!r}")
        self.distill_temperature = float(distill_temperature)
        self.mode = mode
        self.top_k = int(top_k)
        self.decay = float(decay)

    def target(self, teacher_logits: tf.Tensor) -> tf.Tensor:
        """Target distribution ``[batch, num_candidates]`` (rows sum to 1)."""
        if self.mode == "kl":
            return tf.nn.softmax(teacher_logits / self.distill_temperature, axis=-1)
        num_candidates = tf.shape(teacher_logits)[-1]
        positions = tf.range(num_candidates, dtype=teacher_logits.dtype)
        weights = tf.where(positions < self.top_k, tf.exp(-positions / self.decay), tf.zeros_like(positions))
        weights = weights / tf.reduce_sum(weights)
        return tf.broadcast_to(weights, tf.shape(teacher_logits))

    def __call__(self, teacher_logits: tf.Tensor, student_logits: tf.Tensor) -> tf.Tensor:
        """Scalar loss from ``[batch, num_candidates]`` teacher and student logits."""
        target = self.target(teacher_logits)
        log_student = tf.nn.log_softmax(student_logits / self.distill_temperature, axis=-1)
        log_target = tf.math.log(tf.maximum(target, 1e-30))
        kl = tf.reduce_sum(target * (log_target - log_student), axis=-1)
        # Gradients of the softened loss scale as 1/T^2; multiplying by T^2 keeps the soft
        # term's weight against the hard term independent of the temperature.
        return self.distill_temperature**2 * tf.reduce_mean(kl)


def hint_loss(projected_student: tf.Tensor, teacher_embedding: tf.Tensor) -> tf.Tensor:
    """Mean squared error between ``P(student hidden)`` and the teacher's output embedding.

    Args:
        projected_student: ``[batch, teacher_dim]`` student hidden layer after the
            training-only projection ``P``.
        teacher_embedding: ``[batch, teacher_dim]`` the teacher's tower output for the same rows.
    """
    return tf.reduce_mean(tf.square(projected_student - teacher_embedding))
