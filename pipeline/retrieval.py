"""Top-K retrieval indexes saved inside the exported SavedModels.

:class:`IVFTopK` is an inverted-file index: k-means splits the items into partitions, a
query scores the partitions' centroids and then only the items of the best
``probe_partitions`` of them, so its cost follows the embedding width and the items it
actually scores (a brute-force index scores and selects over every item whatever the
model's size); a batch's (query, partition) pairs are grouped by partition, so the probed
items are scored by one batched matmul. :class:`BruteForceTopK` is TFRS's exact ``BruteForce``. Both are TFRS
``TopK`` layers: called with a ``[B]`` string tensor of user ids they return
``(scores [B, k], item_ids [B, k])``, and both expose what exact offline evaluation needs
under the same names: ``query_model`` (ids -> ``[B, d]``), ``item_vectors`` ``[n, d]`` and
``item_ids`` ``[n]``. :func:`build_index` picks one from a :class:`ServingConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import numpy as np

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tensorflow_recommenders as tfrs

from pipeline.config import ServingConfig

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


class IVFTopK(tfrs.layers.factorized_top_k.TopK):
    """Inverted-file top-K: score the centroids, then only the best partitions' items.

    With ``probe_partitions`` at least the number of partitions every item is scored and the
    result equals brute force. Scores are dot products, like TFRS's ``BruteForce``.

    Args:
        serving: ``num_partitions``, ``probe_partitions``, ``partition_capacity``,
            ``kmeans_iterations`` and ``seed`` of the index.
        query_model: Maps the call's inputs to ``[B, d]`` query vectors; None: the call
            takes query vectors.
        k: Default number of results (``serving.top_k`` when None).
        name: Layer name.
    """

    def __init__(self, serving: ServingConfig, query_model: Optional[tf.keras.Model] = None, k: Optional[int] = None,
                 name: Optional[str] = None):
        super().__init__(k=serving.top_k if k is None else k, name=name)
        self.query_model = query_model
        self._serving = serving
        self.centroids = None

    def index(self, candidates: tf.Tensor, identifiers: Optional[tf.Tensor] = None) -> "IVFTopK":
        """Partition ``candidates [n, d]`` (ids ``identifiers [n]``, default ``0..n-1``).

        Raises:
            ValueError: If the shapes disagree or there are fewer items than partitions.
        """
        vectors = np.asarray(candidates, dtype=np.float32)
        ids = tf.range(len(vectors)) if identifiers is None else tf.convert_to_tensor(identifiers)
        if vectors.ndim != 2 or ids.shape.rank != 1 or ids.shape[0] != len(vectors):
            raise ValueError(f"need candidates [n, d] and identifiers [n], got {vectors.shape} and {ids.shape}")
        cfg = self._serving
        partitions = auto_partitions(len(vectors), cfg.num_partitions)
        if partitions > len(vectors):
            raise ValueError(f"serving.num_partitions ({partitions}) exceeds the {len(vectors)} items")
        self._probe = cfg.probe_partitions
        # Every probe must reach k real items, or padding would be returned: partitions keep
        # at least k / probe items (fewer, larger partitions when k / probe exceeds the mean).
        min_size = 1 if self._probe >= partitions else math.ceil(self._k / self._probe)
        built = partition_items(vectors, partitions, cfg.partition_capacity, min_size, cfg.kmeans_iterations, cfg.seed)
        self._min_reach = int(np.sort(built.sizes)[:self._probe].sum())
        self.centroids = tf.Variable(built.centroids, trainable=False, name="centroids")
        self.partition_vectors = tf.Variable(built.vectors, trainable=False, name="partition_vectors")
        self.partition_rows = tf.Variable(built.rows, trainable=False, name="partition_rows")
        self.item_vectors = tf.Variable(vectors, trainable=False, name="item_vectors")
        self.item_ids = tf.Variable(ids, trainable=False, name="item_ids")
        self._reset_tf_function_cache()
        return self

    def call(self, queries, k: Optional[int] = None) -> tuple[tf.Tensor, tf.Tensor]:
        """``(scores [B, k], item_ids [B, k])`` of the best items among the probed partitions.

        Raises:
            ValueError: If the index is not built, or ``k`` exceeds the items the fewest-item
                probe reaches (a result would be padding).
        """
        k = self._k if k is None else k
        if self.centroids is None:
            raise ValueError("call index() before querying an IVFTopK")
        if k > self._min_reach:
            raise ValueError(f"k={k} exceeds the {self._min_reach} items the smallest probe of "
                             f"{self._probe} partitions reaches")
        if self.query_model is not None:
            queries = self.query_model(queries)
        probe = min(self._probe, int(self.centroids.shape[0]))
        _, probed = tf.math.top_k(tf.matmul(queries, self.centroids, transpose_b=True), k=probe)  # [B, probe]
        rows = tf.reshape(tf.gather(self.partition_rows, probed), [tf.shape(queries)[0], -1])  # [B, probe * M]
        scores = tf.reshape(self._score_probed(queries, probed), tf.shape(rows))
        scores = tf.where(rows >= 0, scores, tf.constant(-np.inf, scores.dtype))  # padding never wins
        top_scores, positions = tf.math.top_k(scores, k=k)
        return top_scores, tf.gather(self.item_ids, tf.gather(rows, positions, batch_dims=1))

    def _score_probed(self, queries: tf.Tensor, probed: tf.Tensor) -> tf.Tensor:
        """Scores ``[B * p, M]`` of every (query, probed partition) pair, row ``b * p + j``.

        Pairs are grouped by partition into tiles of ``T = ceil(B * p / P)`` queries (the
        mean per partition; 1 for a single query), so one batched matmul
        ``[tiles, T, d] x [tiles, d, M]`` reads each probed partition once per tile instead
        of once per query: a batch costs about ``B * p * M * d`` multiply-adds at matmul
        speed. At most one tile per partition is part-filled, so there are fewer than
        ``B * p / T + P`` tiles and the gathered partitions are at most about twice the
        ``[P, M, d]`` table (a brute-force batch holds a ``[B, n]`` score matrix instead).
        """
        num_partitions, dim = int(self.centroids.shape[0]), int(self.centroids.shape[1])
        batch, probe = tf.shape(probed)[0], tf.shape(probed)[1]
        part = tf.reshape(probed, [-1])  # [B * p] each pair's partition
        order = tf.argsort(part, stable=True)
        counts = tf.math.bincount(part, minlength=num_partitions, maxlength=num_partitions)  # [P] pairs per partition
        rank_sorted = tf.range(tf.size(part)) - tf.gather(tf.cumsum(counts, exclusive=True), tf.gather(part, order))
        rank = tf.gather(rank_sorted, tf.math.invert_permutation(order))  # pair's place among its partition's pairs
        tile_size = (tf.size(part) + num_partitions - 1) // num_partitions
        tiles = (counts + tile_size - 1) // tile_size  # [P]
        where = tf.stack([tf.gather(tf.cumsum(tiles, exclusive=True), part) + rank // tile_size, rank % tile_size], axis=1)
        tile_queries = tf.tensor_scatter_nd_update(  # [tiles, T]; empty slots hold the zero query at row B
            tf.fill([tf.reduce_sum(tiles), tile_size], batch), where, tf.repeat(tf.range(batch), probe))
        padded_queries = tf.concat([queries, tf.zeros([1, dim], queries.dtype)], axis=0)  # [B + 1, d]
        tile_scores = tf.matmul(tf.gather(padded_queries, tile_queries),  # [tiles, T, M]
                                tf.gather(self.partition_vectors, tf.repeat(tf.range(num_partitions), tiles)),
                                transpose_b=True)
        return tf.gather_nd(tile_scores, where)

    def is_exact(self) -> bool:
        return self.centroids is not None and self._probe >= int(self.centroids.shape[0])


class BruteForceTopK(tfrs.layers.factorized_top_k.BruteForce):
    """TFRS's exact ``BruteForce``, its index also reachable as ``item_vectors`` and ``item_ids``."""

    def index(self, candidates: tf.Tensor, identifiers: Optional[tf.Tensor] = None) -> "BruteForceTopK":
        super().index(candidates, identifiers)
        # The same two variables under public names (saved once), as IVFTopK names them.
        self.item_vectors, self.item_ids = self._candidates, self._identifiers
        return self


def build_index(query_model: Optional[tf.keras.Model], item_vectors: np.ndarray, item_ids: np.ndarray,
                serving: ServingConfig) -> tfrs.layers.factorized_top_k.TopK:
    """The index ``serving.index`` names, over every item, returning ``min(top_k, n)`` items.

    Args:
        query_model: String user ids ``[B]`` -> query vectors ``[B, d]``; None: the index
            is called with query vectors.
        item_vectors: ``[n, d]`` float32 item vectors.
        item_ids: ``[n]`` item ids, returned by the index.
        serving: Index kind and settings.
    """
    k = min(serving.top_k, len(item_vectors))
    if serving.index == "brute_force":
        index = BruteForceTopK(query_model, k=k)
    else:
        index = IVFTopK(serving, query_model, k=k)
    return index.index(tf.constant(item_vectors, tf.float32), identifiers=tf.constant(item_ids))


def save_index(index: tfrs.layers.factorized_top_k.TopK, example_ids: np.ndarray, path: str | Path) -> Path:
    """Trace ``index`` on ``example_ids`` (a few user ids) and save it as a SavedModel at ``path``."""
    index(tf.constant(np.asarray(example_ids).astype(str)))  # trace once so the call signature exists
    tf.saved_model.save(index, str(path))
    return Path(path)
