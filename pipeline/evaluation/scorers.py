"""Scorers: anything that scores every item for a batch of users, given what they did before.

:class:`EmbeddingScorer` (dot products of user and item vectors), :class:`QueryScorer`
(a query tower run batch by batch against item vectors), :class:`MostPopularScorer` (train
popularity) and :class:`SavedModelScorer` (an exported retrieval SavedModel, i.e. the
artefact that would be served); the ALS baseline's fold-in scorer lives in
:mod:`pipeline.evaluation.baselines`. TensorFlow is imported only by :class:`SavedModelScorer`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import numpy as np


@dataclasses.dataclass(frozen=True)
class History:
    """The interactions a batch of users had before the evaluated split (what serving knows of them).

    Attributes:
        rows: ``[P]`` the batch row of each interaction, ascending.
        items: ``[P]`` its ``item_idx``.
        weights: ``[P]`` its weight (negative: the user disliked the item).
    """

    rows: np.ndarray
    items: np.ndarray
    weights: np.ndarray


@runtime_checkable
class Scorer(Protocol):
    """Anything that scores every item for a batch of users.

    Attributes:
        num_items: Width of the score matrix, including the padding index 0.
    """

    num_items: int

    def score(self, user_idx: np.ndarray, history: History) -> np.ndarray:
        """Scores of all items.

        Args:
            user_idx: ``[B]`` int32 user indices.
            history: Their interactions before the evaluated split (most scorers know
                their users already and ignore it).

        Returns:
            ``[B, num_items]`` float32 scores, higher is better (column 0 is padding).
        """
        ...


class QueryScorer:
    """Dot products of query vectors, computed batch by batch, with item vectors.

    No table of every user's vector is built: a batch's queries exist only while it is scored.

    Args:
        embed_users: ``[B]`` user indices -> ``[B, d]`` query vectors (e.g. a query tower).
        item_vectors: ``[n_items, d]``, row ``item_idx`` (row 0 is padding).
    """

    def __init__(self, embed_users: Callable[[np.ndarray], np.ndarray], item_vectors: np.ndarray) -> None:
        self.embed_users = embed_users
        self.item_vectors = np.asarray(item_vectors, dtype=np.float32)
        if self.item_vectors.ndim != 2:
            raise ValueError(f"item_vectors must be 2-D, got shape {self.item_vectors.shape}")
        self.num_items = self.item_vectors.shape[0]

    def score(self, user_idx: np.ndarray, history: History | None = None) -> np.ndarray:
        """``[B, num_items]`` float32: ``embed_users(user_idx) @ item_vectors.T``."""
        return np.asarray(self.embed_users(np.asarray(user_idx)), dtype=np.float32) @ self.item_vectors.T


class EmbeddingScorer(QueryScorer):
    """Dot products of stored user vectors and item vectors.

    Args:
        user_vectors: ``[n_users, d]``, row ``user_idx`` (row 0 is padding).
        item_vectors: ``[n_items, d]``, row ``item_idx`` (row 0 is padding).

    Raises:
        ValueError: If the matrices are not 2-D or their widths differ.
    """

    def __init__(self, user_vectors: np.ndarray, item_vectors: np.ndarray) -> None:
        self.user_vectors = np.asarray(user_vectors, dtype=np.float32)
        super().__init__(self._lookup, item_vectors)
        if self.user_vectors.ndim != 2:
            raise ValueError(f"user_vectors must be 2-D, got shape {self.user_vectors.shape}")
        if self.user_vectors.shape[1] != self.item_vectors.shape[1]:
            raise ValueError(
                f"user and item vectors differ in width: {self.user_vectors.shape[1]} vs {self.item_vectors.shape[1]}"
            )

    def _lookup(self, user_idx: np.ndarray) -> np.ndarray:
        """``user_vectors[user_idx]``.

        Raises:
            ValueError: If a user index is outside ``[0, n_users)``.
        """
        if user_idx.size and (user_idx.min() < 0 or user_idx.max() >= len(self.user_vectors)):
            raise ValueError(f"user_idx outside [0, {len(self.user_vectors)}): min {user_idx.min()}, max {user_idx.max()}")
        return self.user_vectors[user_idx]


class MostPopularScorer:
    """The same scores for every user: the item's number of train interactions.

    Args:
        popularity: ``[n_items]`` train interactions per item (row 0 is padding).
    """

    def __init__(self, popularity: np.ndarray) -> None:
        self.popularity = np.asarray(popularity, dtype=np.float32)
        if self.popularity.ndim != 1:
            raise ValueError(f"popularity must be 1-D, got shape {self.popularity.shape}")
        self.num_items = len(self.popularity)

    def score(self, user_idx: np.ndarray, history: History | None = None) -> np.ndarray:
        """``[B, num_items]`` float32, every row equal to the popularity (a read-only view)."""
        return np.broadcast_to(self.popularity, (len(user_idx), self.num_items))


class SavedModelScorer:
    """Scores every item of today's vocabulary with an exported retrieval SavedModel.

    Evaluates the artefact that would be served, exactly: its ``query_model`` (behind its own
    user-id lookup) against every item of its ``item_vectors`` (whatever index serves them,
    IVF or brute force), matched to today's item ids by string. Items the model does not
    know score ``-inf``; a champion trained on an older vocabulary is thus judged on today's
    split like everyone else.
    """

    def __init__(self, saved_model_dir: str | Path, user_ids: np.ndarray, item_ids: np.ndarray) -> None:
        import tensorflow as tf

        self._tf = tf
        self.model = tf.saved_model.load(str(saved_model_dir))
        # Every exported index (pipeline.modeling.retrieval) names its exact item table item_vectors and
        # item_ids; a champion exported before that is a bare tfrs BruteForce (_candidates, _identifiers).
        legacy = not hasattr(self.model, "item_vectors")
        vectors = (self.model._candidates if legacy else self.model.item_vectors).numpy()
        ids = (self.model._identifiers if legacy else self.model.item_ids).numpy().astype(str)
        position = {item: row for row, item in enumerate(ids)}
        rows = np.array([position.get(str(item), -1) for item in item_ids])
        self.known = rows >= 0
        self.item_vectors = np.zeros((len(item_ids), vectors.shape[1]), np.float32)
        self.item_vectors[self.known] = vectors[rows[self.known]]
        self.user_ids = np.asarray(user_ids).astype(str)
        self.num_items = len(item_ids)

    def score(self, user_idx: np.ndarray, history: History | None = None) -> np.ndarray:
        """``[B, num_items]`` float32 from the model's own query tower (it keeps its users' histories)."""
        queries = self.model.query_model(self._tf.constant(self.user_ids[user_idx])).numpy()
        scores = queries @ self.item_vectors.T
        scores[:, ~self.known] = -np.inf
        return scores.astype(np.float32)
