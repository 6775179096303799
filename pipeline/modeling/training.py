"""Shared training machinery: the streaming ``tf.data`` input, the early-stopping loop and
its per-epoch TensorBoard scalars."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Protocol

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from pipeline.config import EvalConfig, PipelineConfig, TrainingConfig
from pipeline.data.features import Sequences, UserTable, load_sequences, stream_interactions, with_history_before_test
from pipeline.evaluation import QueryScorer, evaluate_scorer
from pipeline.evaluation.serving_cost import count_trainable_params
from pipeline.modeling.models import embed_all
from pipeline.modeling.schedule import phase_schedule

log = logging.getLogger(__name__)

# What tensorboard.summary.scalar writes, from TensorFlow's own protos (no tensorboard package needed).
_SCALAR = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
                                      data_class=summary_pb2.DATA_CLASS_SCALAR)
# The TensorBoard runs of one training, below its log directory.
SELECTION_RUN, REFIT_RUN = "selection", "refit"
# An exported model's weights (folders beside ``saved_model/``), and a refitted model's selection run's
# (train only, never saw validation: tomorrow's selection run warm-starts from it).
CHECKPOINT, SELECTION_CHECKPOINT = "checkpoint", "checkpoint_selection"


class UserColumns(Protocol):
    """Per-user columns joined onto each training pair (the teacher's soft targets, for one).

    Attributes:
        specs: ``name -> tf.TensorSpec([None, ...])`` of each column.
    """

    specs: dict[str, tf.TensorSpec]

    def __call__(self, user_idx: np.ndarray) -> dict[str, np.ndarray]:
        """``user_idx [n]`` -> ``name -> [n, ...]`` rows of each column."""


def interaction_dataset(features_dir: str | Path, split: str | tuple[str, ...], batch_size: int, shuffle_buffer: int, seed: int,
                        sequences: Sequences | None = None, history_length: int = 0,
                        user_columns: UserColumns | None = None) -> tf.data.Dataset:
    """Batches ``{"user_idx": [batch], "item_idx": [batch]}`` streamed from the feature Parquet.

    pyarrow reads record batches one at a time, so memory is bounded by the shuffle
    buffer, not by the number of interactions. With ``sequences`` each batch also holds
    ``"history": [batch, history_length]``, the items the user touched before that pair;
    with ``user_columns``, each of its columns (joined per record batch, before the shuffle,
    so the buffer holds them too).
    """

    def record_batches():
        for batch in stream_interactions(features_dir, split):
            users = batch.column("user_idx").to_numpy().astype(np.int32)
            items = batch.column("item_idx").to_numpy().astype(np.int32)
            out = {"user_idx": users, "item_idx": items}
            if sequences is not None:
                out["history"] = sequences.histories(users, items, history_length)
            if user_columns is not None:
                out.update(user_columns(users))
            yield out

    spec = {name: tf.TensorSpec([None], tf.int32) for name in ("user_idx", "item_idx")}
    if sequences is not None:
        spec["history"] = tf.TensorSpec([None, history_length], tf.int32)
    if user_columns is not None:
        spec.update(user_columns.specs)
    return (
        tf.data.Dataset.from_generator(record_batches, output_signature=spec)
        .unbatch()
        .shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


def seed_everything(seed: int) -> None:
    """Make the training that follows repeatable: seed Python, numpy and TensorFlow, and
    have TensorFlow use deterministic kernels only.

    Then the same features, settings and seed give bit-identical weights in any process
    with the same TensorFlow thread counts (tests/test_reproducibility.py); the counts
    matter (2 and 8 intra-op threads give other last bits), so :func:`numeric_runtime`
    records them. Deterministic kernels cost nothing measurable on CPU (ML-100K teacher,
    5 epochs: 36.5-39.4 s of CPU with them, 37.8-38.1 s without); they compute the softmax
    cross-entropies as ``log_softmax`` compositions (the fused GPU kernels are not
    deterministic), which moves the last bits, and make an op without a deterministic
    kernel raise instead of varying.
    """
    tf.keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def numeric_runtime() -> dict:
    """What a trained model's last bits depend on besides its inputs, settings, seed and
    TensorFlow version: recorded in its metadata, so two runs that differ can be told apart.

    Returns:
        ``{"op_determinism", "intra_op_threads", "inter_op_threads"}``: each thread count as
        TensorFlow resolves it (set in the process, else ``$TF_NUM_INTRAOP_THREADS`` /
        ``$TF_NUM_INTEROP_THREADS``, else the CPUs this process may run on).
    """
    from tensorflow.python.framework import config as tf_config  # is_op_determinism_enabled has no public name

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def threads(configured: int, from_env: str) -> int:
        value = from_env.strip()
        return configured or (int(value) if value.isdigit() else 0) or cpus

    return {
        "op_determinism": bool(tf_config.is_op_determinism_enabled()),
        "intra_op_threads": threads(tf.config.threading.get_intra_op_parallelism_threads(), os.environ.get("TF_NUM_INTRAOP_THREADS", "")),
        "inter_op_threads": threads(tf.config.threading.get_inter_op_parallelism_threads(), os.environ.get("TF_NUM_INTEROP_THREADS", "")),
    }


@contextlib.contextmanager
def epoch_scalars(log_dir: str | Path | None) -> Iterator[Callable[[int, Mapping[str, float]], None]]:
    """A function ``(epoch, {tag: value})`` that writes one epoch's scalars as TensorBoard
    event files in ``log_dir``, flushed at once so a running training can be watched.

    Args:
        log_dir: The run's log directory (created if missing); None writes nothing.
    """
    if log_dir is None:
        yield lambda epoch, scalars: None
        return
    writer = tf.summary.create_file_writer(str(log_dir))

    def write(epoch: int, scalars: Mapping[str, float]) -> None:
        with writer.as_default():
            for tag, value in scalars.items():
                tf.summary.write(tag, tf.constant(value, tf.float32), step=epoch, metadata=_SCALAR)
        writer.flush()

    try:
        yield write
    finally:
        writer.close()


@dataclasses.dataclass
class FitResult:
    """What a training run learned and how."""

    best_epoch: int
    best_score: float
    history: list[dict]
    seconds: float


def fit_with_early_stopping(
    model: tf.keras.Model,
    dataset: tf.data.Dataset,
    epochs: int,
    patience: int,
    validate: Callable[[tf.keras.Model], Mapping[str, float]],
    watch: str,
    label: str,
    log_dir: str | Path | None = None,
) -> FitResult:
    """Train epoch by epoch, keep the weights of the best validation score, stop on a plateau.

    Args:
        model: A compiled model whose ``fit`` returns each loss term by name.
        dataset: One epoch of training batches.
        epochs: Most epochs.
        patience: Epochs without improvement before stopping.
        validate: Model -> validation metrics by name.
        watch: The metric of ``validate`` that selects the epoch (higher is better).
        label: Name used in the log lines.
        log_dir: Where each epoch's history row and validation metrics (``validation/<name>``)
            go as TensorBoard scalars; None: nowhere.

    Returns:
        The best epoch and score and one history row per epoch (loss terms, ``val_score``: the
        watched metric, seconds).
    """
    started = time.perf_counter()
    best_score, best_epoch, best_weights, history = -np.inf, 0, None, []
    with epoch_scalars(log_dir) as write_scalars:
        for epoch in range(1, epochs + 1):
            tick = time.perf_counter()
            losses = {k: float(v[-1]) for k, v in model.fit(dataset, epochs=1, verbose=0).history.items()}
            metrics = validate(model)
            score = float(metrics[watch])
            history.append({"epoch": epoch, **losses, "val_score": score, "seconds": round(time.perf_counter() - tick, 2)})
            write_scalars(epoch, {**_scalars(history[-1]), **{f"validation/{k}": v for k, v in metrics.items()}})
            terms = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
            log.info("%s epoch %d/%d: %s val=%.4f (%.1fs)", label, epoch, epochs, terms, score, history[-1]["seconds"])
            if score > best_score:
                best_score, best_epoch, best_weights = score, epoch, model.get_weights()
            elif epoch - best_epoch >= patience:
                log.info("%s: no validation gain for %d epochs, stopping at epoch %d", label, patience, epoch)
                break
    if best_weights is not None:
        model.set_weights(best_weights)
    return FitResult(best_epoch, float(best_score), history, round(time.perf_counter() - started, 2))


@dataclasses.dataclass
class Trained:
    """A trained two-tower model (or distillation model around one) and how it was trained.

    Attributes:
        model: The model to export: refitted on train + validation when ``training.refit``.
        fit: The selection run on the train split, early-stopped on validation.
        validation: Validation metrics of the selection run's best weights.
        params: Trainable parameters of the two towers.
        refit: ``{"epochs", "splits", "history", "seconds"}`` of the refit, or None.
        selection_model: The selection run's model at its best epoch, train only (``model`` without a refit).
        schedule: Per phase run, ``{"warm", "learning_rate"}`` (and the selection run's ``patience``).
    """

    model: tf.keras.Model
    fit: FitResult
    validation: dict
    params: int
    refit: dict | None
    selection_model: tf.keras.Model
    schedule: dict = dataclasses.field(default_factory=dict)

    def record(self, tensorboard: str) -> dict:
        """What a model's ``metadata.json`` says of its training (``tensorboard``: its log folder, relative)."""
        return {"trainable_params": self.params, "metrics": {"validation": self.validation}, "best_epoch": self.fit.best_epoch,
                "history": self.fit.history, "refit": self.refit,
                "seconds": round(self.fit.seconds + (self.refit or {}).get("seconds", 0.0), 2), "schedule": self.schedule,
                "tensorflow": tf.__version__, "runtime": numeric_runtime(), "tensorboard": tensorboard}


def train_two_tower(build: Callable[[UserTable, str], tf.keras.Model], towers: Callable[[tf.keras.Model], tf.keras.Model],
                    features_dir: str | Path, users: UserTable, num_items: int, cfg: PipelineConfig, epochs: int,
                    label: str, user_columns: Mapping[str, UserColumns] | None = None,
                    log_dir: str | Path | None = None, warm: Callable[[str], bool] | None = None) -> Trained:
    """Select the epochs on validation, then (``training.refit``) retrain on all that is known.

    The selection run fits on the train split and keeps the weights of the best validation
    Recall@K. With ``refit``, a fresh model (same seed) is then trained on train +
    validation for that many epochs, each pair seeing the items before it, and its stored
    history is the latest of train + validation: the validation days are the newest before
    the held-out test days (and before tomorrow's requests, in production), and a model
    that never trained on them serves a stale picture of every user. Only the test split
    stays held out, so the gate and the benchmark still judge unseen interactions.

    Each phase has its own model and per-user columns: what the selection run learns from
    must not have seen validation, or its validation score, and so the epochs it selects,
    are biased (a student's soft targets from a teacher refitted on validation point it at
    the very items it is judged on).

    Each epoch's history row goes to TensorBoard as it ends: the selection run's (with every
    validation metric) under ``log_dir/selection``, the refit's under ``log_dir/refit``.

    A phase that starts from last night's weights trains under the warm policy (:func:`phase_schedule`).

    Args:
        build: ``(users, phase)`` -> the model to train in ``phase`` (:data:`SELECTION_RUN`,
            then :data:`REFIT_RUN`): a two-tower model, or a distillation model around one.
        towers: ``model`` -> the two-tower model whose query and candidate towers are judged.
        features_dir: The feature partition.
        users: The user table (latest train history).
        num_items: Item vocabulary size (with padding).
        cfg: Settings (``training`` and ``evaluate``).
        epochs: Most epochs of the selection run.
        label: Name in the log lines.
        user_columns: Per-user columns every training batch carries (see :func:`interaction_dataset`),
            by phase; None: none in either phase.
        log_dir: The training's TensorBoard log directory; None: no logs.
        warm: ``phase`` -> whether ``build``'s model for it starts warm (``WarmStart.started``); None: cold.

    Raises:
        ValueError: When ``user_columns`` lacks a phase that runs.
    """
    def validation(m: tf.keras.Model) -> dict:
        two_tower = towers(m)
        # Queries are embedded batch by batch as users are scored: no [users, d] table.
        embed_users = lambda u: two_tower.query(tf.constant(u, tf.int32), training=False).numpy()  # noqa: E731
        scorer = QueryScorer(embed_users, embed_all(two_tower.candidate, num_items))
        return evaluate_scorer(scorer, features_dir, "validation", eval_cfg)

    training = cfg.training
    phases = (SELECTION_RUN, REFIT_RUN) if training.refit else (SELECTION_RUN,)
    missing = [phase for phase in phases if user_columns is not None and phase not in user_columns]
    if missing:
        raise ValueError(f"{label}: no user columns for the {' and '.join(missing)} phase (given: {sorted(user_columns)})")
    columns = user_columns or {}
    eval_cfg = with_k(cfg.evaluate, training.early_stopping_k)
    watch = f"recall@{training.early_stopping_k}"
    started_warm = warm or (lambda phase: False)
    model = build(users, SELECTION_RUN)
    schedule = {SELECTION_RUN: phase_schedule(training, started_warm(SELECTION_RUN))}
    model = _compiled(model, schedule[SELECTION_RUN]["learning_rate"])
    dataset = _dataset(features_dir, ("train",), num_items, users.history.shape[1], training, columns.get(SELECTION_RUN))
    fit = fit_with_early_stopping(model, dataset, epochs, schedule[SELECTION_RUN]["patience"], validation, watch, label,
                                  None if log_dir is None else Path(log_dir) / SELECTION_RUN)
    trained = Trained(model, fit, validation(model), count_trainable_params(towers(model)), None, model, dict(schedule))
    if not training.refit:
        return trained
    started = time.perf_counter()
    seed_everything(training.seed)
    splits = ("train", "validation")
    model = build(with_history_before_test(features_dir, users, num_items), REFIT_RUN)
    schedule[REFIT_RUN] = {key: value for key, value in phase_schedule(training, started_warm(REFIT_RUN)).items() if key != "patience"}
    model = _compiled(model, schedule[REFIT_RUN]["learning_rate"])
    dataset = _dataset(features_dir, splits, num_items, users.history.shape[1], training, columns.get(REFIT_RUN))
    history = []
    with epoch_scalars(None if log_dir is None else Path(log_dir) / REFIT_RUN) as write_scalars:
        for epoch in range(1, fit.best_epoch + 1):
            tick = time.perf_counter()
            losses = {k: float(v[-1]) for k, v in model.fit(dataset, epochs=1, verbose=0).history.items()}
            history.append({"epoch": epoch, **losses, "seconds": round(time.perf_counter() - tick, 2)})
            write_scalars(epoch, _scalars(history[-1]))
            log.info("%s refit epoch %d/%d on train + validation: %s (%.1fs)", label, epoch, fit.best_epoch,
                     " ".join(f"{k}={v:.4f}" for k, v in losses.items()), history[-1]["seconds"])
    refit = {"epochs": fit.best_epoch, "splits": list(splits), "history": history,
             "seconds": round(time.perf_counter() - started, 2)}
    return dataclasses.replace(trained, model=model, refit=refit, schedule=schedule)


def _scalars(row: Mapping[str, float]) -> dict[str, float]:
    """A history row as TensorBoard scalars: every value but the epoch (the step), tagged by its key."""
    return {key: value for key, value in row.items() if key != "epoch"}


def _compiled(model: tf.keras.Model, learning_rate: float) -> tf.keras.Model:
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate))
    return model


def _dataset(features_dir: str | Path, splits: tuple[str, ...], num_items: int, history_length: int,
             training: TrainingConfig, user_columns: UserColumns | None = None) -> tf.data.Dataset:
    """Training batches of ``splits``, each pair with its causal history when ``training.causal_history``."""
    sequences = load_sequences(features_dir, num_items, splits) if training.causal_history else None
    return interaction_dataset(features_dir, splits, training.batch_size, training.shuffle_buffer, training.seed,
                               sequences, history_length, user_columns)


def with_k(cfg: EvalConfig, k: int) -> EvalConfig:
    """``cfg`` with ``k`` among its cut-offs (early stopping watches Recall@k)."""
    return dataclasses.replace(cfg, ks=tuple(sorted(set(cfg.ks) | {k})))
