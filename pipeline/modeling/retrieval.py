"""Top-K retrieval indexes saved inside the exported SavedModels.

:class:`IVFTopK` is an inverted-file index: k-means splits the items into partitions, a
query scores the partitions' centroids and then only the items of the best
``probe_partitions`` of them, so its cost follows the embedding width and the items it
actually scores (a brute-force index scores and selects over every item whatever the
model's size); a batch's (query, partition) pairs are grouped by partition, so the probed
items are scored by one batched matmul. :class:`BruteForceTopK` is TFRS's exact ``BruteForce``
that selects the top K by blocks on large catalogues (:func:`block_top_k`, still exact). Both are TFRS
``TopK`` layers: called with a ``[B]`` string tensor of user ids they return
``(scores [B, k], item_ids [B, k])``, and both expose what exact offline evaluation needs
under the same names: ``query_model`` (ids -> ``[B, d]``), ``item_vectors`` ``[n, d]`` and
``item_ids`` ``[n]``. :func:`build_index` picks one from a :class:`ServingConfig`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from pipeline.config import ServingConfig
from pipeline.modeling.partitions import Partitions, auto_partitions, partition_items  # noqa: F401  (re-exported)


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


# Below this many items per result, one top_k over every item is faster than two block
# selections (measured at k=100, batch 256: break-even near 10k items; 1.7k items: 3.2 ms
# plain vs 4.3 ms by blocks; 100k items: 46 ms vs 27 ms at d=128).
_BLOCKS_FROM_ITEMS_PER_RESULT = 100


def auto_block_size(num_items: int, k: int) -> int:
    """1 (no blocks) for small catalogues, else about ``sqrt(num_items / k)``, which balances
    the two selections of :func:`block_top_k`."""
    if num_items < _BLOCKS_FROM_ITEMS_PER_RESULT * k:
        return 1
    return max(1, round(math.sqrt(num_items / max(k, 1))))


def block_top_k(scores: tf.Tensor, k: int, block_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Exact ``tf.math.top_k(scores, k)`` that selects over about ``n / b + k * b`` scores per row, not ``n``.

    The items are cut into blocks of ``b = block_size`` columns. The ``k`` blocks of highest
    maximum hold every top-``k`` item: a block holding one has a maximum at least the k-th
    best score, and at most ``k`` blocks (each owning a distinct item that scores that high)
    do. So a row selects its ``k`` best blocks by their maxima ``[B, n / b]``, then its ``k``
    best items among those blocks' ``k * b`` scores. Ties may pick other items of equal score.

    Args:
        scores: ``[B, n]`` float scores.
        k: Results per row, ``<= n``.
        block_size: Columns per block; 1 (or too few blocks to gain) is a plain ``top_k``.

    Returns:
        ``(values [B, k], indices [B, k])`` as ``tf.math.top_k`` returns them.
    """
    n = int(scores.shape[1])
    blocks = -(-n // block_size)
    if block_size <= 1 or blocks <= k:
        return tf.math.top_k(scores, k=k)
    pad = blocks * block_size - n
    if pad:  # the last block's missing columns never win
        scores = tf.pad(scores, [[0, 0], [0, pad]], constant_values=-np.inf)
    grid = tf.reshape(scores, [-1, blocks, block_size])  # [B, blocks, b]
    _, best_blocks = tf.math.top_k(tf.reduce_max(grid, axis=2), k=k)  # [B, k]
    candidates = tf.reshape(tf.gather(grid, best_blocks, batch_dims=1), [-1, k * block_size])  # [B, k * b]
    values, positions = tf.math.top_k(candidates, k=k)
    block = tf.gather(best_blocks, positions // block_size, batch_dims=1)
    return values, block * block_size + positions % block_size


class BruteForceTopK(tfrs.layers.factorized_top_k.BruteForce):
    """TFRS's exact ``BruteForce``, its index also reachable as ``item_vectors`` and ``item_ids``.

    Every item is scored; the top ``k`` are selected by :func:`block_top_k` (``block_size``
    0: about ``sqrt(n / k)``; 1: a plain ``tf.math.top_k`` over every item), so selection
    no longer costs more than the scoring that a smaller embedding makes cheaper.
    """

    def __init__(self, query_model: Optional[tf.keras.Model] = None, k: int = 10, block_size: int = 0,
                 name: Optional[str] = None):
        super().__init__(query_model, k=k, name=name)
        self._block_size = block_size

    def index(self, candidates: tf.Tensor, identifiers: Optional[tf.Tensor] = None) -> "BruteForceTopK":
        super().index(candidates, identifiers)
        # The same two variables under public names (saved once), as IVFTopK names them.
        self.item_vectors, self.item_ids = self._candidates, self._identifiers
        return self

    def call(self, queries, k: Optional[int] = None) -> tuple[tf.Tensor, tf.Tensor]:
        """``(scores [B, k], item_ids [B, k])`` of the best of every item (exact)."""
        k = self._k if k is None else k
        if self._candidates is None:
            raise ValueError("call index() before querying a BruteForceTopK")
        if self.query_model is not None:
            queries = self.query_model(queries)
        n = int(self._candidates.shape[0])
        block_size = self._block_size or auto_block_size(n, k)
        values, indices = block_top_k(tf.matmul(queries, self._candidates, transpose_b=True), k, block_size)
        return values, tf.gather(self._identifiers, indices)


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
        index = BruteForceTopK(query_model, k=k, block_size=serving.block_size)
    else:
        index = IVFTopK(serving, query_model, k=k)
    return index.index(tf.constant(item_vectors, tf.float32), identifiers=tf.constant(item_ids))


def save_index(index: tfrs.layers.factorized_top_k.TopK, example_ids: np.ndarray, path: str | Path) -> Path:
    """Trace ``index`` on ``example_ids`` (a few user ids) and save it as a SavedModel at ``path``."""
    index(tf.constant(np.asarray(example_ids).astype(str)))  # trace once so the call signature exists
    tf.saved_model.save(index, str(path))
    return Path(path)
