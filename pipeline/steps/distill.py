"""Distil the teacher's soft targets into a small student:
``python -m pipeline.steps.distill --ds ... [--set distill.alpha=0.7 ...]``.

Loss per batch of interactions ``(user, item)``::

    alpha * hard                          softmax cross-entropy on the true interactions (batch mean)
  + (1 - alpha) * T^2 * KL(p_t || p_s)    T = distill_temperature; over the whole catalogue when it is
                                          small enough, else the user's teacher top-K + sampled negatives
  + beta * hint                           MSE(P(student hidden), teacher embedding), users and items

All three terms are batch means, so alpha and beta weigh terms of comparable scale.

The teacher is never trained or even loaded here: its signal comes from the soft-target
Parquet. Each user's top-K and embedding travel with the training pairs through ``tf.data``
(:class:`~pipeline.soft_targets.rows.UserSoftTargets`, memory-mapped), so no table of every
user's targets is held in memory; the item embeddings, far fewer, are one non-trainable
table. ``P`` (the hint projections)
belongs to :class:`DistillationModel` only, so the exported student does not carry it.
With ``alpha=1, beta=0`` (:meth:`PipelineConfig.plain_student`) the same code trains the
plain student, the no-distillation baseline.

With ``training.refit`` the teacher's main soft targets come from its refit on train +
validation: the student's selection run, judged on validation, learns from the teacher's
selection-run set instead (``selection/``, :meth:`Catalog.selection_soft_targets`), and only
its refit from the main set; its metadata names both (``soft_targets_by_phase``). A refitted
student keeps its selection run's weights in ``checkpoint_selection/`` beside ``checkpoint/``:
tomorrow's warm-started selection run starts from them (:mod:`pipeline.modeling.warm_start`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import tensorflow as tf
import tensorflow_recommenders as tfrs

from pipeline import cli
from pipeline.catalog import TENSORBOARD, Catalog
from pipeline.config import DistillConfig, PipelineConfig
from pipeline.data.features import load_item_table, load_user_table, users_of_split, with_history_before_test
from pipeline.io import atomic_dir, temp_dir
from pipeline.modeling.losses import SoftTargetLoss, hint_loss
from pipeline.modeling.models import TwoTowerModel, build_student, export_retrieval, size_student
from pipeline.modeling.training import CHECKPOINT, REFIT_RUN, SELECTION_CHECKPOINT, SELECTION_RUN, seed_everything, train_two_tower
from pipeline.modeling.warm_start import warm_start_of
from pipeline.records import ModelMetadata, SoftTargetManifest
from pipeline.serving import read_index_record
from pipeline.soft_targets.rows import TeacherItems, UserSoftTargets, read_teacher_items

log = logging.getLogger(__name__)


class DistillationModel(tfrs.Model):
    """A student plus the frozen teacher signal and the training-only hint projections.

    Each batch carries its users' teacher signal: ``teacher_topk [B, K]`` and
    ``teacher_user [B, D]`` beside ``user_idx`` and ``item_idx`` (see :class:`UserSoftTargets`).
    """

    def __init__(self, student: TwoTowerModel, teacher_items: TeacherItems, cfg: DistillConfig,
                 retrieval_temperature: float, **kwargs):
        super().__init__(**kwargs)
        self.student = student
        self.cfg = cfg
        # Held whole: items are far fewer than users, and any batch may need any item.
        self.teacher_item = tf.Variable(teacher_items.embedding, trainable=False, name="teacher_item_embedding")  # [items, D]
        self.num_items = int(teacher_items.embedding.shape[0])
        # Scores -> logits, as each model was trained: its scores divided by its retrieval temperature.
        self.teacher_scale = teacher_items.logit_scale
        self.student_scale = 1.0 / retrieval_temperature
        teacher_dim = int(teacher_items.embedding.shape[1])
        self.user_projection = tf.keras.layers.Dense(teacher_dim, use_bias=False, name="hint_projection_user")
        self.item_projection = tf.keras.layers.Dense(teacher_dim, use_bias=False, name="hint_projection_item")
        self.soft_loss = SoftTargetLoss(cfg.distill_temperature, cfg.soft_loss, teacher_items.top_k, cfg.ranking_decay)
        # Small catalogues: the soft targets are the teacher's distribution over every real item.
        full = cfg.soft_loss == "kl" and self.num_items - 1 <= cfg.full_catalogue_max_items
        self.catalogue = tf.range(1, self.num_items, dtype=tf.int32) if full else None

    def loss_terms(self, features: dict, training: bool = True) -> dict[str, tf.Tensor]:
        """Every loss term of one batch by name, and their weighted ``loss``.

        Args:
            features: ``user_idx [B]``, ``item_idx [B]``, ``teacher_topk [B, K]``,
                ``teacher_user [B, D]`` (and ``history``, which the hard loss uses).
        """
        cfg = self.cfg
        users, items = features["user_idx"], features["item_idx"]
        hard = self.student.hard_loss(features, training=training)
        user_vec, user_hidden = self.student.query.embed(users, training=training)  # [B, d], [B, h]
        teacher_user = features["teacher_user"]  # [B, D]
        if self.catalogue is not None:  # every real item: [B, num_items - 1]
            student_logits = self.student_scale * tf.matmul(user_vec, self.student.candidate(self.catalogue, training=training), transpose_b=True)
            teacher_logits = self.teacher_scale * tf.matmul(teacher_user, tf.gather(self.teacher_item, self.catalogue), transpose_b=True)
        else:
            student_logits, teacher_logits = self._sampled_logits(features["teacher_topk"], user_vec, teacher_user, training)
        soft = self.soft_loss(teacher_logits, student_logits)
        _, item_hidden = self.student.candidate.embed(items, training=training)
        hint = hint_loss(self.user_projection(user_hidden), teacher_user) + hint_loss(
            self.item_projection(item_hidden), tf.gather(self.teacher_item, items))
        loss = cfg.alpha * hard + (1.0 - cfg.alpha) * soft + cfg.beta * hint
        return {"loss": loss, "hard_loss": hard, "soft_loss": soft, "hint_loss": hint}

    def _sampled_logits(self, teacher_topk: tf.Tensor, user_vec: tf.Tensor, teacher_user: tf.Tensor,
                        training: bool) -> tuple[tf.Tensor, tf.Tensor]:
        """Student and teacher logits ``[B, K+S]`` over each user's teacher top-K ``[B, K]``, then uniform negatives.

        The cost of a batch is bounded by its ``B x (K+S)`` candidates, whatever the catalogue's
        size: the candidate tower runs once per distinct candidate, and each row's candidates
        are scored against its own user only (scoring every distinct candidate against every
        user, ``[B, distinct]``, grows with the catalogue up to ``[B, items]``).
        """
        negatives = tf.random.uniform([tf.shape(teacher_topk)[0], self.cfg.sampled_negatives], 1, self.num_items, dtype=tf.int32)
        candidates = tf.concat([teacher_topk, negatives], axis=1)  # [B, C = K+S]
        unique, position = tf.unique(tf.reshape(candidates, [-1]))
        student_items = tf.gather(self.student.candidate(unique, training=training), tf.reshape(position, tf.shape(candidates)))  # [B, C, d]
        teacher_items = tf.gather(self.teacher_item, candidates)  # [B, C, D]
        return (self.student_scale * tf.einsum("bd,bcd->bc", user_vec, student_items),
                self.teacher_scale * tf.einsum("bd,bcd->bc", teacher_user, teacher_items))

    def compute_loss(self, features, training=False):
        return self.loss_terms(features, training)["loss"]

    def train_step(self, features):
        with tf.GradientTape() as tape:
            terms = self.loss_terms(features, training=True)
            total = terms["loss"] + tf.add_n(self.losses) if self.losses else terms["loss"]
        variables = self.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(total, variables), variables))
        return terms


def distill_student(ds: str, catalog: Catalog, cfg: PipelineConfig, role: str = "student") -> dict:
    """Train a student (by distillation, or plainly when ``alpha=1, beta=0``) and export it.

    Args:
        ds: Logical date of the features.
        catalog: Where artifacts live; the soft targets are those ``cfg`` identifies.
        cfg: Settings; ``cfg.distill`` holds T, alpha, beta and the loss variant, ``cfg.student``
            the architecture and epochs.
        role: ``"student"`` or ``"student_plain"`` (the catalogue keeps them apart).

    Returns:
        ``{"path", "version", "metrics", "best_epoch", "epochs", "trainable_params", "teacher_version", ...}``.

    Raises:
        ArtifactNotFound: When the features or the soft targets have not been published.
    """
    features_dir = catalog.features(ds)
    soft_targets_dir = catalog.soft_targets(ds, cfg)
    # The selection run is judged on validation: it learns from soft targets that never saw it.
    phase_dirs = {SELECTION_RUN: catalog.selection_soft_targets(ds, cfg)}
    if cfg.training.refit:
        phase_dirs[REFIT_RUN] = soft_targets_dir
    manifests = {phase: SoftTargetManifest.load(path) for phase, path in phase_dirs.items()}
    seed_everything(cfg.training.seed)
    users, items = load_user_table(features_dir), load_item_table(features_dir)
    teacher_items = {phase: read_teacher_items(path, items.size) for phase, path in phase_dirs.items()}
    final = catalog.student(ds, cfg, role)
    warm = warm_start_of(role, ds, catalog, cfg, build_student)
    with atomic_dir(final) as tmp:  # trains inside it: the TensorBoard logs, written as epochs end, publish with the model
        with temp_dir(final) as scratch:  # the memory-mapped per-user soft targets, deleted after training
            columns = {phase: UserSoftTargets(path, _made(scratch / phase)) for phase, path in phase_dirs.items()}
            trained = train_two_tower(
                lambda u, phase: DistillationModel(warm.apply(build_student(u, items, cfg), u, items, phase), teacher_items[phase],
                                                   cfg.distill, cfg.training.retrieval_temperature),
                lambda m: m.student, features_dir, users, items.size, cfg, cfg.student.epochs, role,
                user_columns=columns, log_dir=tmp / TENSORBOARD, warm=warm.started)
        student, fit, params = trained.model.student, trained.fit, trained.params
        meta = ModelMetadata.from_dict({
            "version": final.name, "ds": ds, "role": role, "features": str(features_dir), "soft_targets": str(soft_targets_dir),
            "teacher_version": manifests[SELECTION_RUN].teacher_version, "config": cfg.to_dict(), "config_hash": cfg.config_hash(),
            "architecture": dataclasses.asdict(size_student(users, items, cfg)), **trained.record(TENSORBOARD),
            "soft_targets_by_phase": {phase: {"path": str(phase_dirs[phase]), "teacher_weights": manifest.teacher_weights}
                                      for phase, manifest in manifests.items()},
            "selection_checkpoint": SELECTION_CHECKPOINT if trained.refit else None, "warm_start": warm.record,
        })
        if trained.refit:  # tomorrow's warm selection run starts from these (train only)
            trained.selection_model.student.save_weights(str(tmp / SELECTION_CHECKPOINT / "weights"))
        export_retrieval(student, with_history_before_test(features_dir, users, items.size), items, tmp / "saved_model", cfg.serving,
                         probe_user_ids=users.user_ids[users_of_split(features_dir, "validation")])
        student.save_weights(str(tmp / CHECKPOINT / "weights"))
        meta = dataclasses.replace(meta, extra={**meta.extra, "serving_index": read_index_record(tmp)})
        meta.save(tmp)
    log.info("%s %s: %d params, best epoch %d, validation recall@%d=%.4f", role, final.name, params, fit.best_epoch,
             cfg.training.early_stopping_k, fit.best_score)
    return {"path": str(final), "version": final.name, "metrics": meta.metrics, "best_epoch": fit.best_epoch,
            "epochs": len(fit.history), "trainable_params": params, "teacher_version": meta.teacher_version,
            "soft_targets": str(soft_targets_dir), "seconds": meta.seconds, "warm_start": meta.warm_start}


def _made(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def main(argv=None) -> int:
    return cli.run_step(distill_student, "Distil the teacher into a small student and export it.", argv)


if __name__ == "__main__":
    raise SystemExit(main())
