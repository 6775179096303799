"""Warm start: begin tonight's training from the previous night's model of the same settings.

Tonight's vocabularies differ from last night's (new users and items arrive, some vanish), so
the id embeddings are matched **by id**: a user or item known both nights keeps its row, a new
one keeps the fresh initialisation a cold start would give it, a vanished one is dropped. Every
other weight (side-feature embeddings, the towers' dense layers) is copied when its shape is
unchanged and left fresh otherwise (a side feature with a new bucket, say). The optimiser
starts afresh: its moments belong to last night's rows and learning rate schedule. Training
then runs as a cold start does, with the same early stopping and refit rules, at the warm
learning rate and (selection) patience of ``training.warm_learning_rate_scale`` and
``training.warm_patience``, from last night's weights shrunk towards a fresh initialisation by
``training.warm_keep`` (:func:`blend`). Each phase
starts from last night's weights of the same phase (:class:`WarmStart`): the selection run,
judged on validation, never starts from weights that trained on validation interactions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from pipeline.config import PipelineConfig, load_config
from pipeline.data.features import ItemTable, UserTable, load_item_table, load_user_table
from pipeline.modeling.training import CHECKPOINT, REFIT_RUN, SELECTION_RUN
from pipeline.records import FeatureManifest, ModelMetadata

log = logging.getLogger(__name__)

# Id embeddings matched by id: (tower attribute, layer attribute, which vocabulary).
ID_EMBEDDINGS = (("query", "user_embedding", "users"), ("query", "history_embedding", "items"),
                 ("candidate", "item_embedding", "items"))


def remap_rows(previous: np.ndarray, previous_ids: Sequence, fresh: np.ndarray, ids: Sequence,
               keep: float = 1.0) -> tuple[np.ndarray, dict]:
    """Tonight's embedding table: the rows of ids known last night copied from ``previous``
    (``keep`` of them, the rest of the fresh row: :func:`blend`).

    Args:
        previous: ``[n_prev, d]`` last night's table, row ``i`` for ``previous_ids[i]``.
        previous_ids: ``[n_prev]`` last night's ids; row 0 is padding (never copied).
        fresh: ``[n, d]`` tonight's freshly initialised table, row ``j`` for ``ids[j]``.
        ids: ``[n]`` tonight's ids; row 0 is padding.
        keep: Share of last night's row in a copied row.

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
        table[rows] = blend(previous[previous_rows], table[rows], keep)
    kept = len(pairs)
    return table, {"kept": kept, "new": len(ids) - 1 - kept, "dropped": len(previous_ids) - 1 - kept}


def blend(previous: np.ndarray, fresh: np.ndarray, keep: float) -> np.ndarray:
    """``keep * previous + (1 - keep) * fresh``: last night's weights shrunk towards a fresh
    initialisation ("shrink and perturb", Ash & Adams 2020, *On Warm-Starting Neural Network
    Training*): a model trained to convergence and trained on generalises worse than a fresh
    one; shrinking it first keeps most of what it knows and lets it fit tonight's data again.
    ``keep`` 1: last night's weights as they were."""
    if keep == 1.0:
        return previous
    return (keep * previous + (1.0 - keep) * fresh).astype(previous.dtype)


def _build(model: tf.keras.Model) -> None:
    """Create every variable of a two-tower model (Keras builds them on the first call)."""
    model.query(tf.constant([0], dtype=tf.int32))
    model.candidate(tf.constant([0], dtype=tf.int32))


def transfer_weights(previous: tf.keras.Model, previous_vocab: dict[str, Sequence], model: tf.keras.Model,
                     vocab: dict[str, Sequence], keep: float = 1.0) -> dict:
    """Copy ``previous`` into ``model`` (both two-tower models of one architecture), id rows by id.

    Args:
        previous: Last night's restored model.
        previous_vocab: ``{"users": ids by row, "items": ids by row}`` of last night.
        model: Tonight's freshly built model; changed in place.
        vocab: The same for tonight.
        keep: Share of last night's value in every weight copied (:func:`blend` with the fresh one).

    Returns:
        ``{"users": {"kept", "new", "dropped"}, "items": {...}, "copied": n weights copied whole,
        "fresh": names of the weights left fresh (shape changed)}``.
    """
    _build(previous)
    _build(model)
    # Checked before anything is copied, so a refused model stays as a cold start built it.
    if len(previous.trainable_variables) != len(model.trainable_variables):
        raise ValueError("last night's model has another architecture: warm start needs the same settings")
    for tower, layer, _ in ID_EMBEDDINGS:
        old, new = (getattr(getattr(m, tower), layer).embeddings for m in (previous, model))
        if old.shape[1] != new.shape[1]:
            raise ValueError(f"{layer} widths differ: {old.shape[1]} last night, {new.shape[1]} tonight")
    counts, handled = {}, set()
    for tower, layer, kind in ID_EMBEDDINGS:
        old = getattr(getattr(previous, tower), layer).embeddings
        new = getattr(getattr(model, tower), layer).embeddings
        table, count = remap_rows(old.numpy(), previous_vocab[kind], new.numpy(), vocab[kind], keep)
        new.assign(table)
        counts.setdefault(kind, count)
        handled.add(id(new))
    # The rest pair up by position: one architecture tracks its variables in one order (their
    # names carry per-process layer counters, so they differ between two instances).
    pairs = list(zip(previous.trainable_variables, model.trainable_variables))
    copied, fresh = 0, []
    for source, variable in pairs:
        if id(variable) in handled:
            continue
        if tuple(source.shape) == tuple(variable.shape):
            variable.assign(blend(source.numpy(), variable.numpy(), keep))
            copied += 1
        else:
            fresh.append(variable.name)
    return {**counts, "copied": copied, "fresh": fresh}


class WarmStart:
    """Tonight's models of one role start from ``previous`` (a model directory), or cold.

    Each training phase starts from last night's weights of the same phase: the selection run
    (judged on validation) from last night's selection run, trained on train only; the refit
    from last night's exported model. Last night's refit trained on last night's validation
    interactions, most of which are tonight's validation too: a selection run started from it
    would be judged on what it has learnt, and pick its epochs blind. When last night's model
    was refitted but kept no selection weights, the selection run starts cold.

    Args:
        previous: Last night's model of the same settings (:meth:`pipeline.catalog.Catalog.previous_model`),
            or None for a cold start.
        build: ``(users, items, cfg)`` -> a two-tower model of the previous night's settings
            (``build_teacher`` or ``build_student``), to restore its checkpoints into.
        reason: Why the start is cold, when ``previous`` is None.
        keep: Share of last night's value in each weight it gives (``training.warm_keep``, :func:`blend`).
    """

    def __init__(self, previous: Path | None, build: Callable[[UserTable, ItemTable, PipelineConfig], tf.keras.Model],
                 reason: str = "no previous model of these settings", keep: float = 1.0):
        self.previous, self.record, self.warm_phases, self.keep = {}, {"cold": reason}, set(), keep
        if previous is None:
            return
        meta = ModelMetadata.load(previous)
        features = Path(meta.features) if meta.features else None
        if features is None or not FeatureManifest.exists(features):
            self.record = {"cold": f"the features {features} of {previous.name} are gone"}
            log.warning("cold start: %s", self.record["cold"])
            return
        users, items = load_user_table(features), load_item_table(features)
        cfg = load_config(meta.config)
        folders = {REFIT_RUN: CHECKPOINT, SELECTION_RUN: CHECKPOINT}
        if meta.refitted:
            folders[SELECTION_RUN] = meta.selection_checkpoint
        phases, restored = {}, {}  # restored: folder -> model (both phases read one folder when not refitted)
        for phase, folder in folders.items():
            if folder is None:
                phases[phase] = f"cold: {previous.name} was refitted without its selection run's weights"
                continue
            if folder not in restored:
                restored[folder] = build(users, items, cfg)
                _build(restored[folder])
                restored[folder].load_weights(str(Path(previous) / folder / "weights")).expect_partial()
            self.previous[phase], phases[phase] = restored[folder], folder
        self.vocab = {"users": users.user_ids, "items": items.item_ids}
        self.record = {"from": str(previous), "version": previous.name, "ds": meta.ds, "phases": phases,
                       **({"keep": keep} if keep != 1.0 else {})}

    def apply(self, model: tf.keras.Model, users: UserTable, items: ItemTable, phase: str) -> tf.keras.Model:
        """``model`` (freshly built for tonight's ``phase``) with last night's weights of that
        phase, or as it is when that phase starts cold."""
        previous = self.previous.get(phase)
        if previous is None:
            return model
        try:
            counts = transfer_weights(previous, self.vocab, model, {"users": users.user_ids, "items": items.item_ids}, self.keep)
        except ValueError as refused:  # e.g. a student sized differently on tonight's catalogue
            self.previous, self.record = {}, {"cold": f"{self.record['version']}: {refused}"}
            log.warning("cold start: %s", self.record["cold"])
            return model
        self.record.update({"users": counts["users"], "items": counts["items"], "fresh_weights": counts["fresh"]})
        self.warm_phases.add(phase)
        log.info("warm start of the %s run from %s/%s: users %s, items %s", phase, self.record["version"],
                 self.record["phases"][phase], counts["users"], counts["items"])
        return model


    def started(self, phase: str) -> bool:
        """Whether the model :meth:`apply` gave for ``phase`` starts from last night's weights."""
        return phase in self.warm_phases


def warm_start_of(role: str, ds: str, catalog, cfg: PipelineConfig,
                  build: Callable[[UserTable, ItemTable, PipelineConfig], tf.keras.Model]) -> WarmStart:
    """Where tonight's model of ``role`` starts: last night's of the same settings (``catalog``
    finds it by recorded metadata), or cold when ``training.warm_start`` is off or there is none."""
    if not cfg.training.warm_start:
        return WarmStart(None, build, reason="warm start is off (training.warm_start)")
    return WarmStart(catalog.previous_model(role, ds, cfg), build, keep=cfg.training.warm_keep)
