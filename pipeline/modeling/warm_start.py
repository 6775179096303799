"""Warm start: begin tonight's training from the previous night's model of the same settings.

Tonight's vocabularies differ from last night's (new users and items arrive, some vanish), so
the id embeddings are matched **by id**: a user or item known both nights keeps its row, a new
one keeps the fresh initialisation a cold start would give it, a vanished one is dropped. Every
other weight (side-feature embeddings, the towers' dense layers) is copied when its shape is
unchanged and left fresh otherwise (a side feature with a new bucket, say). The optimiser
starts afresh: its moments belong to last night's rows and learning rate schedule. Training
then runs as a cold start does, with the same early stopping and refit rules.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

# Id embeddings matched by id: (tower attribute, layer attribute, which vocabulary).
ID_EMBEDDINGS = (("query", "user_embedding", "users"), ("query", "history_embedding", "items"),
                 ("candidate", "item_embedding", "items"))


def remap_rows(previous: np.ndarray, previous_ids: Sequence, fresh: np.ndarray, ids: Sequence) -> tuple[np.ndarray, dict]:
    """Tonight's embedding table: the rows of ids known last night copied from ``previous``.

    Args:
        previous: ``[n_prev, d]`` last night's table, row ``i`` for ``previous_ids[i]``.
        previous_ids: ``[n_prev]`` last night's ids; row 0 is padding (never copied).
        fresh: ``[n, d]`` tonight's freshly initialised table, row ``j`` for ``ids[j]``.
        ids: ``[n]`` tonight's ids; row 0 is padding.

    Returns:
        ``(table [n, d], {"kept", "new", "dropped"})``: counts of real ids known both nights,
        only tonight, only last night.

    Raises:
        ValueError: When the widths differ.
    """
    if previous.shape[1] != fresh.shape[1]:
        raise ValueError(f"embedding widths differ: {previous.shape[1]} last night, {fresh.shape[1]} tonight")
    row_of = {str(identifier): i for i, identifier in enumerate(previous_ids) if i > 0}
    pairs = [(j, row_of[str(identifier)]) for j, identifier in enumerate(ids) if j > 0 and str(identifier) in row_of]
    table = np.array(fresh, copy=True)
    if pairs:
        rows, previous_rows = (np.array(side, dtype=np.int64) for side in zip(*pairs))
        table[rows] = previous[previous_rows]
    kept = len(pairs)
    return table, {"kept": kept, "new": len(ids) - 1 - kept, "dropped": len(previous_ids) - 1 - kept}


def _build(model: tf.keras.Model) -> None:
    """Create every variable of a two-tower model (Keras builds them on the first call)."""
    model.query(tf.constant([0], dtype=tf.int32))
    model.candidate(tf.constant([0], dtype=tf.int32))


def transfer_weights(previous: tf.keras.Model, previous_vocab: dict[str, Sequence], model: tf.keras.Model,
                     vocab: dict[str, Sequence]) -> dict:
    """Copy ``previous`` into ``model`` (both two-tower models of one architecture), id rows by id.

    Args:
        previous: Last night's restored model.
        previous_vocab: ``{"users": ids by row, "items": ids by row}`` of last night.
        model: Tonight's freshly built model; changed in place.
        vocab: The same for tonight.

    Returns:
        ``{"users": {"kept", "new", "dropped"}, "items": {...}, "copied": n weights copied whole,
        "fresh": names of the weights left fresh (shape changed)}``.
    """
    _build(previous)
    _build(model)
    counts, handled = {}, set()
    for tower, layer, kind in ID_EMBEDDINGS:
        old = getattr(getattr(previous, tower), layer).embeddings
        new = getattr(getattr(model, tower), layer).embeddings
        table, count = remap_rows(old.numpy(), previous_vocab[kind], new.numpy(), vocab[kind])
        new.assign(table)
        counts.setdefault(kind, count)
        handled.add(id(new))
    # The rest pair up by position: one architecture tracks its variables in one order (their
    # names carry per-process layer counters, so they differ between two instances).
    pairs = list(zip(previous.trainable_variables, model.trainable_variables))
    if len(previous.trainable_variables) != len(model.trainable_variables):
        raise ValueError("last night's model has another architecture: warm start needs the same settings")
    copied, fresh = 0, []
    for source, variable in pairs:
        if id(variable) in handled:
            continue
        if tuple(source.shape) == tuple(variable.shape):
            variable.assign(source)
            copied += 1
        else:
            fresh.append(variable.name)
    return {**counts, "copied": copied, "fresh": fresh}
