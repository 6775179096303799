"""Scoring users with a restored teacher: its top-K items per user, known items excluded.

Both soft-target engines (:mod:`pipeline.steps.soft_targets` in this process,
:mod:`pipeline.soft_targets.spark_engine` in Spark's Python workers) score through
:class:`TeacherScorer`, in the same batches (:func:`user_batches`), so they write the same
rows: a matrix product's last bits depend on the shape of the batch it is computed in.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import tensorflow as tf

from pipeline.config import load_config
from pipeline.data.features import load_item_table, load_user_table
from pipeline.modeling.models import TwoTowerModel, build_teacher, embed_all, restore_teacher
from pipeline.records import ArtifactNotFound, ModelMetadata


def user_schema(k: int, dim: int) -> pa.Schema:
    """The schema of ``users.parquet``: ``k`` candidates, ``dim``-wide embeddings."""
    return pa.schema([
        ("user_idx", pa.int32()), ("user_id", pa.string()),
        ("topk_item_idx", pa.list_(pa.int32(), k)), ("topk_scores", pa.list_(pa.float32(), k)),
        ("teacher_user_embedding", pa.list_(pa.float32(), dim)),
    ])


def fixed_list(matrix: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """``matrix [rows, width]`` as a ``fixed_size_list<dtype>[width]`` array."""
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), type=dtype), matrix.shape[1])


def top_k_excluding(scores: np.ndarray, exclude: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` columns of each row of ``scores [batch, items]``, column 0 and ``exclude[row]`` masked.

    Masked columns score ``-inf``, so a row with fewer than ``k`` candidates ends with masked
    columns. Equal scores go to the lower column: the result is that of a stable sort of
    every column, best first, cut at ``k``, but only the ``k`` chosen columns are sorted.

    Args:
        scores: ``[batch, items]`` scores, ``k < items``.
        exclude: ``batch`` arrays of the columns to mask in each row.
        k: Columns kept per row.

    Returns:
        ``(indices [batch, k] int32, scores [batch, k] float32)``, best first.

    Raises:
        ValueError: When a score is NaN (it has no place in the order).
    """
    masked = scores.astype(np.float32, copy=True)
    if np.isnan(masked).any():
        raise ValueError(f"{int(np.isnan(masked).sum())} teacher score(s) are NaN")
    masked[:, 0] = -np.inf
    lengths = [len(items) for items in exclude]
    if sum(lengths):
        masked[np.repeat(np.arange(len(exclude)), lengths), np.concatenate(exclude)] = -np.inf
    n = masked.shape[1]
    kth = np.partition(masked, n - k, axis=1)[:, n - k, None]  # each row's k-th best score, in linear time
    above, tied = masked > kth, masked == kth
    # Of the columns tied at the k-th score, the lowest take the places left, as in a stable sort.
    places = k - above.sum(axis=1, keepdims=True)
    chosen = above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= places))
    columns = np.nonzero(chosen)[1].reshape(-1, k)  # exactly k per row, in column order
    order = np.argsort(-np.take_along_axis(masked, columns, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(columns, order, axis=1)
    return top.astype(np.int32), np.take_along_axis(masked, top, axis=1)


def user_batches(chunks: Iterable[tuple[np.ndarray, list[np.ndarray]]],
                 batch_size: int) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """Regroup users (in order, chunk by chunk) into batches of ``batch_size`` consecutive users.

    The batches do not depend on the chunks: batch ``b`` holds users ``b * batch_size`` up
    to ``(b + 1) * batch_size - 1`` in order, the last one possibly fewer.

    Args:
        chunks: ``(users [m], items)`` pairs, e.g. :func:`pipeline.data.features.stream_user_items`.
        batch_size: Users per batch.

    Yields:
        ``(users [<= batch_size], items)`` of each batch.
    """
    users, known = np.empty(0, np.int32), []
    for chunk_users, chunk_known in chunks:
        users, known = np.concatenate([users, chunk_users]), known + list(chunk_known)
        full = len(users) - len(users) % batch_size
        for start in range(0, full, batch_size):
            yield users[start:start + batch_size], known[start:start + batch_size]
        users, known = users[full:], known[full:]
    if len(users):
        yield users, known


@dataclasses.dataclass(frozen=True)
class TeacherScorer:
    """A restored teacher and what scoring needs besides it.

    Attributes:
        model: The teacher.
        user_ids: ``[n_users]`` original user ids, row ``user_idx``.
        item_ids: ``[n_items]`` original item ids, row ``item_idx``.
        item_vectors: ``[n_items, dim]`` the candidate tower's embeddings (row 0 is padding).
        k: Candidates per user (at most the real items).
        meta: The teacher's recorded metadata.
        weights: The checkpoint directory its weights came from, relative to the teacher's.
        known_splits: The splits whose items a user is known to have had when these weights
            were trained (excluded from its candidates).
    """

    model: TwoTowerModel
    user_ids: np.ndarray
    item_ids: np.ndarray
    item_vectors: np.ndarray
    k: int
    meta: ModelMetadata
    weights: str
    known_splits: tuple[str, ...]

    @property
    def dim(self) -> int:
        return int(self.item_vectors.shape[1])

    @property
    def selection_run(self) -> bool:
        """Whether these are a refitted teacher's selection-run weights (trained on train only)."""
        return self.weights == self.meta.selection_checkpoint

    def score(self, users: np.ndarray, known: Sequence[np.ndarray]) -> pa.Table:
        """The soft-target rows of one batch of users.

        Args:
            users: ``[batch]`` ``user_idx``, ascending.
            known: ``batch`` arrays of each user's known items (excluded from its top K).

        Returns:
            ``batch`` rows of :func:`user_schema`.
        """
        users = np.asarray(users, dtype=np.int32)
        user_vectors = self.model.query(tf.constant(users), training=False).numpy()
        top_idx, top_scores = top_k_excluding(user_vectors @ self.item_vectors.T, known, self.k)
        return pa.Table.from_arrays([
            pa.array(users, pa.int32()), pa.array(self.user_ids[users].astype(str), pa.string()),
            fixed_list(top_idx, pa.int32()), fixed_list(top_scores, pa.float32()),
            fixed_list(user_vectors.astype(np.float32), pa.float32()),
        ], schema=user_schema(self.k, self.dim))

    def items_table(self) -> pa.Table:
        """``item_idx``, ``item_id`` and ``teacher_item_embedding`` of every item."""
        return pa.Table.from_arrays([
            pa.array(np.arange(len(self.item_ids)), pa.int32()), pa.array(self.item_ids.astype(str), pa.string()),
            fixed_list(self.item_vectors.astype(np.float32), pa.float32()),
        ], names=["item_idx", "item_id", "teacher_item_embedding"])


def load_scorer(teacher_dir: str | Path, features_dir: str | Path, top_k: int, selection_run: bool = False) -> TeacherScorer:
    """Restore the teacher of ``teacher_dir`` and embed every item.

    Args:
        teacher_dir: The exported teacher.
        features_dir: The features it was trained on.
        top_k: Candidates wanted per user (capped at the real items).
        selection_run: Restore a refitted teacher's selection-run weights (trained on train
            only, querying with the train history) instead of its refitted ones.

    Raises:
        ArtifactNotFound: When ``teacher_dir`` holds no exported teacher, or (``selection_run``)
            no selection-run weights.
    """
    if selection_run:
        model, users, items, meta, weights = _restore_selection_run(Path(teacher_dir), features_dir)
        known: tuple[str, ...] = ("train",)
    else:
        model, users, items, meta = restore_teacher(teacher_dir, features_dir)
        weights, known = "checkpoint", ("train", "validation") if meta.refitted else ("train",)
    return TeacherScorer(model, users.user_ids, items.item_ids, embed_all(model.candidate, items.size),
                         min(top_k, items.size - 1), meta, weights, known)


def _restore_selection_run(teacher_dir: Path, features_dir: str | Path):
    """``(model, users, items, meta, weights)`` of a refitted teacher's selection run, as it was
    validated: built on the train history (the refitted teacher's queries see validation too)."""
    meta = ModelMetadata.load(teacher_dir)
    if not meta.selection_checkpoint:
        raise ArtifactNotFound(f"teacher {teacher_dir} has no selection-run weights (not refitted, or exported before "
                               "they were kept): run train_teacher again")
    users, items = load_user_table(features_dir), load_item_table(features_dir)
    model = build_teacher(users, items, load_config(meta.config))
    model.load_weights(str(teacher_dir / meta.selection_checkpoint / "weights")).expect_partial()
    return model, users, items, meta, meta.selection_checkpoint
