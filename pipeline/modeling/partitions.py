"""Balanced spherical k-means partitions of item vectors, for the IVF index (:mod:`pipeline.modeling.retrieval`)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Items scored against the centroids at once while partitioning: bounds the [rows, P]
# score block's memory (64k x 1,000 partitions = 256 MB); results do not depend on it.
_BLOCK_ROWS = 1 << 16


@dataclasses.dataclass(frozen=True)
class Partitions:
    """Items grouped by partition, padded to the largest partition.

    Attributes:
        centroids: ``[P, d]`` float32 unit-norm k-means centroids.
        vectors: ``[P, M, d]`` float32 item vectors of each partition, zeros as padding.
        rows: ``[P, M]`` int32 item rows (into the ``[n, d]`` item table), -1 as padding.
    """

    centroids: np.ndarray
    vectors: np.ndarray
    rows: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        """``[P]`` real items per partition."""
        return (self.rows >= 0).sum(axis=1)


def auto_partitions(num_items: int, num_partitions: int) -> int:
    """``num_partitions``, or about sqrt(``num_items``) when it is 0."""
    return num_partitions or max(1, round(math.sqrt(num_items)))


def partition_items(vectors: np.ndarray, num_partitions: int, capacity: float, min_size: int, iterations: int,
                    seed: int) -> Partitions:
    """Split item vectors into balanced k-means partitions of dot-product similarity.

    Spherical k-means (unit-norm centroids, items go to the centroid of highest dot
    product) runs ``iterations`` Lloyd steps from ``num_partitions`` items drawn with
    ``seed``. Then items are placed best-centroid first, a partition keeping at most
    ``ceil(capacity * n / P)`` items (its most similar ones) and spilling the rest to their
    next-best centroid with room, so one huge partition cannot pad every other. Partitions
    with fewer than ``min_size`` items are dissolved (smallest first) into their items'
    next-best partitions, so every probe of ``p`` partitions reaches ``p * min_size`` items.

    Args:
        vectors: ``[n, d]`` item vectors (the models' embeddings are L2-normalised).
        num_partitions: Partitions before dissolving, in ``[1, n]``.
        capacity: Largest partition as a multiple of the mean partition, >= 1.
        min_size: Fewest items a partition may keep, >= 1.
        iterations: Lloyd iterations, >= 0.
        seed: Seed of the initial centroids and of empty-partition restarts.

    Returns:
        The partitions, deterministic for given inputs.

    Raises:
        ValueError: On an empty or non-2-D ``vectors`` or a setting out of range.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"item vectors must be a non-empty [n, d] matrix, got shape {vectors.shape}")
    n = len(vectors)
    if not 1 <= num_partitions <= n or capacity < 1 or min_size < 1 or iterations < 0:
        raise ValueError(f"need 1 <= num_partitions ({num_partitions}) <= items ({n}), capacity ({capacity}) >= 1, "
                         f"min_size ({min_size}) >= 1 and iterations ({iterations}) >= 0")
    rng = np.random.default_rng(seed)
    centroids = _unit(vectors[np.sort(rng.choice(n, num_partitions, replace=False))])
    for _ in range(iterations):
        owner, _ = _best_centroid(vectors, np.arange(n), centroids, np.ones(num_partitions, bool))
        counts = np.bincount(owner, minlength=num_partitions)
        sums = np.stack([np.bincount(owner, weights=vectors[:, j], minlength=num_partitions)
                         for j in range(vectors.shape[1])], axis=1)
        empty = counts == 0
        sums[empty] = vectors[rng.choice(n, int(empty.sum()), replace=False)]
        centroids = _unit(sums.astype(np.float32))

    is_open = np.ones(num_partitions, bool)
    owner = np.full(n, -1, np.int64)
    _fill(vectors, centroids, owner, np.arange(n), is_open, capacity)
    while is_open.sum() > 1:
        sizes = np.where(is_open, np.bincount(owner, minlength=num_partitions), n + 1)
        smallest = int(np.argmin(sizes))
        if sizes[smallest] >= min_size:
            break
        is_open[smallest] = False
        members = np.flatnonzero(owner == smallest)
        owner[members] = -1
        _fill(vectors, centroids, owner, members, is_open, capacity)
    return _pad(vectors, centroids[is_open], np.cumsum(is_open)[owner] - 1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)


def _best_centroid(vectors: np.ndarray, rows: np.ndarray, centroids: np.ndarray,
                   allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best ``allowed`` centroid of each item of ``rows`` and its score: ``([r], [r])``."""
    best, score = np.empty(len(rows), np.int64), np.empty(len(rows), np.float32)
    for start in range(0, len(rows), _BLOCK_ROWS):
        block = vectors[rows[start:start + _BLOCK_ROWS]] @ centroids.T
        block[:, ~allowed] = -np.inf
        best[start:start + len(block)] = block.argmax(axis=1)
        score[start:start + len(block)] = block[np.arange(len(block)), best[start:start + len(block)]]
    return best, score


def _fill(vectors: np.ndarray, centroids: np.ndarray, owner: np.ndarray, pending: np.ndarray, is_open: np.ndarray,
          capacity: float) -> None:
    """Place the items ``pending`` (in ``owner``, in place) in their best open partition with room.

    Each round every pending item asks for its best partition with room; a partition takes
    the most similar askers that fit and the others ask again. A round either places
    everyone or fills a partition, so there are at most ``P`` rounds.
    """
    cap = math.ceil(capacity * len(owner) / is_open.sum())
    while pending.size:
        room = np.where(is_open, cap - np.bincount(owner[owner >= 0], minlength=len(is_open)), 0)
        best, score = _best_centroid(vectors, pending, centroids, room > 0)
        order = np.lexsort((-score, best))  # grouped by partition, most similar first
        grouped = best[order]
        rank = np.arange(len(order)) - np.searchsorted(grouped, grouped, side="left")
        placed = np.zeros(len(pending), bool)
        placed[order] = rank < room[grouped]
        owner[pending[placed]] = best[placed]
        pending = pending[~placed]


def _pad(vectors: np.ndarray, centroids: np.ndarray, owner: np.ndarray) -> Partitions:
    sizes = np.bincount(owner, minlength=len(centroids))
    order = np.lexsort((np.arange(len(owner)), owner))  # by partition, then by item row
    slot = np.arange(len(order)) - (np.cumsum(sizes) - sizes)[owner[order]]
    rows = np.full((len(centroids), int(sizes.max())), -1, np.int32)
    rows[owner[order], slot] = order
    padded = vectors[np.maximum(rows, 0)]  # [P, M, d]
    padded[rows < 0] = 0.0
    return Partitions(centroids.astype(np.float32), padded, rows)
