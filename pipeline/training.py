"""Shared training machinery: the streaming ``tf.data`` input and the early-stopping loop."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from pipeline.config import EvalConfig, PipelineConfig
from pipeline.evaluation import EmbeddingScorer, evaluate_scorer
from pipeline.evaluation.serving_cost import count_trainable_params
from pipeline.features import Sequences, load_train_sequences, stream_interactions
from pipeline.models import embed_all

log = logging.getLogger(__name__)


def interaction_dataset(features_dir: str | Path, split: str, batch_size: int, shuffle_buffer: int, seed: int,
                        sequences: Sequences | None = None, history_length: int = 0) -> tf.data.Dataset:
    """Batches ``{"user_idx": [batch], "item_idx": [batch]}`` streamed from the feature Parquet.

    pyarrow reads record batches one at a time, so memory is bounded by the shuffle
    buffer, not by the number of interactions. With ``sequences`` each batch also holds
    ``"history": [batch, history_length]``, the items the user touched before that pair.
    """

    def record_batches():
        for batch in stream_interactions(features_dir, split):
            users = batch.column("user_idx").to_numpy().astype(np.int32)
            items = batch.column("item_idx").to_numpy().astype(np.int32)
            out = {"user_idx": users, "item_idx": items}
            if sequences is not None:
                out["history"] = sequences.histories(users, items, history_length)
            yield out

    spec = {name: tf.TensorSpec([None], tf.int32) for name in ("user_idx", "item_idx")}
    if sequences is not None:
        spec["history"] = tf.TensorSpec([None, history_length], tf.int32)
    return (
        tf.data.Dataset.from_generator(record_batches, output_signature=spec)
        .unbatch()
        .shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


def seed_everything(seed: int) -> None:
    """Seed Python-side and TensorFlow randomness for a repeatable run."""
    tf.keras.utils.set_random_seed(seed)


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
    validate: Callable[[tf.keras.Model], float],
    label: str,
) -> FitResult:
    """Train epoch by epoch, keep the weights of the best validation score, stop on a plateau.

    Args:
        model: A compiled model whose ``fit`` returns each loss term by name.
        dataset: One epoch of training batches.
        epochs: Most epochs.
        patience: Epochs without improvement before stopping.
        validate: Model -> validation score (higher is better).
        label: Name used in the log lines.

    Returns:
        The best epoch and score and one history row per epoch (loss terms, score, seconds).
    """
    started = time.perf_counter()
    best_score, best_epoch, best_weights, history = -np.inf, 0, None, []
    for epoch in range(1, epochs + 1):
        tick = time.perf_counter()
        losses = {k: float(v[-1]) for k, v in model.fit(dataset, epochs=1, verbose=0).history.items()}
        score = float(validate(model))
        history.append({"epoch": epoch, **losses, "val_score": score, "seconds": round(time.perf_counter() - tick, 2)})
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


def train_two_tower(model: tf.keras.Model, towers: Callable[[tf.keras.Model], tf.keras.Model], features_dir: str | Path,
                    num_users: int, num_items: int, cfg: PipelineConfig, epochs: int, label: str) -> tuple[FitResult, dict, int]:
    """Compile and fit ``model`` on the train split, early-stopping on validation Recall@K.

    Args:
        model: The model to train (a two-tower model, or a distillation model around one).
        towers: ``model`` -> the two-tower model whose query and candidate towers are judged.
        features_dir: The feature partition.
        num_users, num_items: Vocabulary sizes (with padding).
        cfg: Settings (``training`` and ``evaluate``).
        epochs: Most epochs.
        label: Name in the log lines.

    Returns:
        ``(fit result, validation metrics of the best weights, trainable parameters of the towers)``.
    """
    def validation(m: tf.keras.Model) -> dict:
        two_tower = towers(m)
        scorer = EmbeddingScorer(embed_all(two_tower.query, num_users), embed_all(two_tower.candidate, num_items))
        return evaluate_scorer(scorer, features_dir, "validation", eval_cfg)

    training = cfg.training
    model.compile(optimizer=tf.keras.optimizers.Adam(training.learning_rate))
    eval_cfg = with_k(cfg.evaluate, training.early_stopping_k)
    watch = f"recall@{training.early_stopping_k}"
    sequences = load_train_sequences(features_dir, num_items) if training.causal_history else None
    history_length = int(towers(model).query.history.shape[1])
    dataset = interaction_dataset(features_dir, "train", training.batch_size, training.shuffle_buffer, training.seed,
                                  sequences, history_length)
    fit = fit_with_early_stopping(model, dataset, epochs, training.patience, lambda m: validation(m)[watch], label)
    params = count_trainable_params(towers(model))
    return fit, validation(model), params


def with_k(cfg: EvalConfig, k: int) -> EvalConfig:
    """``cfg`` with ``k`` among its cut-offs (early stopping watches Recall@k)."""
    return dataclasses.replace(cfg, ks=tuple(sorted(set(cfg.ks) | {k})))
