"""Offline evaluation: full-ranking metrics, baseline scorers and serving-cost measures.

Every model is judged the same way: a :class:`Scorer` scores *all* items for a batch of
users, items the user already had in earlier splits are masked, and the ranking is
compared with the user's items in the evaluated split (:func:`evaluate_scorer`). The
per-batch arithmetic lives in the pure :func:`ranking_metrics`, so it can be checked on
hand-made arrays.

Baselines: :class:`MostPopularScorer` (train popularity) and Spark MLlib implicit ALS
(:func:`fit_als`). Cost measures for the gate: :func:`count_trainable_params`,
:func:`directory_bytes` and :func:`measure_latency` (batched top-K calls on a SavedModel).

TensorFlow and Spark are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from pipeline.config import EvalConfig
from pipeline.features import SPLITS, load_item_table, load_split_pairs

log = logging.getLogger(__name__)

# Fixed cut-offs of the single-number summaries (the Recall/NDCG cut-offs are EvalConfig.ks).
HITRATE_K = 10
COVERAGE_K = 10
# Untimed calls before measuring latency: the first calls build kernels and caches.
LATENCY_WARMUP_CALLS = 3


# ----------------------------------------------------------------------------- scorers


@runtime_checkable
class Scorer(Protocol):
    """Anything that scores every item for a batch of users.

    Attributes:
        num_items: Width of the score matrix, including the padding index 0.
    """

    num_items: int

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        """Scores of all items.

        Args:
            user_idx: ``[B]`` int32 user indices.

        Returns:
            ``[B, num_items]`` float32 scores, higher is better (column 0 is padding).
        """
        ...


class EmbeddingScorer:
    """Dot products of user and item vectors (two-tower models, ALS factors).

    Args:
        user_vectors: ``[n_users, d]``, row ``user_idx`` (row 0 is padding).
        item_vectors: ``[n_items, d]``, row ``item_idx`` (row 0 is padding).

    Raises:
        ValueError: If the matrices are not 2-D or their widths differ.
    """

    def __init__(self, user_vectors: np.ndarray, item_vectors: np.ndarray) -> None:
        self.user_vectors = np.asarray(user_vectors, dtype=np.float32)
        self.item_vectors = np.asarray(item_vectors, dtype=np.float32)
        if self.user_vectors.ndim != 2 or self.item_vectors.ndim != 2:
            raise ValueError(
                f"user_vectors and item_vectors must be 2-D, got shapes {self.user_vectors.shape} and {self.item_vectors.shape}"
            )
        if self.user_vectors.shape[1] != self.item_vectors.shape[1]:
            raise ValueError(
                f"user and item vectors differ in width: {self.user_vectors.shape[1]} vs {self.item_vectors.shape[1]}"
            )
        self.num_items = self.item_vectors.shape[0]

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        """``[B, num_items]`` float32: ``user_vectors[user_idx] @ item_vectors.T``.

        Raises:
            ValueError: If a user index is outside ``[0, n_users)``.
        """
        user_idx = np.asarray(user_idx)
        if user_idx.size and (user_idx.min() < 0 or user_idx.max() >= len(self.user_vectors)):
            raise ValueError(f"user_idx outside [0, {len(self.user_vectors)}): min {user_idx.min()}, max {user_idx.max()}")
        return self.user_vectors[user_idx] @ self.item_vectors.T


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

    @classmethod
    def from_features(cls, features_dir: str | Path) -> "MostPopularScorer":
        """Popularity from ``item_features`` (:attr:`pipeline.features.ItemTable.popularity`)."""
        return cls(load_item_table(features_dir).popularity)

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        """``[B, num_items]`` float32, every row equal to the popularity (a read-only view)."""
        return np.broadcast_to(self.popularity, (len(user_idx), self.num_items))


def fit_als(features_dir: str | Path, cfg: EvalConfig, seed: int, spark: Any = None) -> EmbeddingScorer:
    """Fit Spark MLlib implicit-feedback ALS on the train split.

    The interaction ``weight`` is the implicit rating (confidence ``1 + als_alpha * weight``).
    Users and items without factors (never in train) get zero vectors, i.e. score 0.

    Args:
        features_dir: A published feature partition (``.../ds=<ds>``).
        cfg: ``als_rank``, ``als_reg``, ``als_alpha``, ``als_iterations``.
        seed: ALS initialisation seed.
        spark: Session to use; when None a ``local[2]`` session is started and stopped.

    Returns:
        An :class:`EmbeddingScorer` over ``[n_users, als_rank]`` and ``[n_items, als_rank]``
        factor matrices, row = index (rows 0 are zeros).
    """
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    features_dir = Path(features_dir)
    n_items = load_item_table(features_dir).size
    n_users = 1 + max((int(u.max()) for u in (load_split_pairs(features_dir, s)[0] for s in SPLITS) if len(u)), default=0)

    own_session = spark is None
    if own_session:
        spark = (
            SparkSession.builder.master("local[2]")
            .appName("evaluate_als")
            .config("spark.sql.session.timeZone", "UTC")
            .config("spark.sql.shuffle.partitions", "4")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            # ALS's iterative lineage can overflow the default JVM thread stack.
            .config("spark.driver.extraJavaOptions", "-Xss64m")
            .getOrCreate()
        )
    checkpoints = tempfile.mkdtemp(prefix="als-checkpoints-")
    try:
        # Checkpointing every few iterations truncates the lineage (else StackOverflowError).
        spark.sparkContext.setCheckpointDir(checkpoints)
        started = time.perf_counter()
        train = (
            spark.read.parquet(str(features_dir / "interactions"))
            .where(F.col("split") == "train")
            .select(F.col("user_idx").cast("int"), F.col("item_idx").cast("int"), F.col("weight").cast("float"))
        )
        als = ALS(
            implicitPrefs=True, rank=cfg.als_rank, regParam=cfg.als_reg, alpha=cfg.als_alpha, maxIter=cfg.als_iterations,
            seed=seed, userCol="user_idx", itemCol="item_idx", ratingCol="weight", coldStartStrategy="drop",
            checkpointInterval=5,
        )
        model = als.fit(train)
        user_vectors = _factor_matrix(model.userFactors.collect(), n_users, cfg.als_rank)
        item_vectors = _factor_matrix(model.itemFactors.collect(), n_items, cfg.als_rank)
        log.info(
            "als: rank %d, reg %g, alpha %g, %d iterations; %d users, %d items with factors; fitted in %.1f s",
            cfg.als_rank, cfg.als_reg, cfg.als_alpha, cfg.als_iterations,
            int(np.any(user_vectors, axis=1).sum()), int(np.any(item_vectors, axis=1).sum()), time.perf_counter() - started,
        )
    finally:
        if own_session:
            spark.stop()
        shutil.rmtree(checkpoints, ignore_errors=True)
    return EmbeddingScorer(user_vectors, item_vectors)


def _factor_matrix(rows: Sequence[Any], size: int, rank: int) -> np.ndarray:
    """Spark factor rows ``(id, features)`` -> dense ``[max(size, max id + 1), rank]``, zeros elsewhere."""
    ids = np.array([r["id"] for r in rows], dtype=np.int64)
    matrix = np.zeros((max(size, int(ids.max()) + 1 if len(ids) else 0), rank), dtype=np.float32)
    if len(ids):
        matrix[ids] = np.asarray([r["features"] for r in rows], dtype=np.float32)
    return matrix


# ----------------------------------------------------------------------------- ranking metrics


def top_k_items(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best items per row, best first; ties go to the lower item index.

    Selection is linear in the number of items (``np.partition`` finds each row's k-th
    best score); only the selected ``k`` are sorted. Ties are broken by item index so that
    results repeat exactly, whatever the partition algorithm does with equal values.

    Args:
        scores: ``[B, n]`` float scores (masked items at ``-inf``; no NaN).
        k: Items wanted; clipped to ``n``.

    Returns:
        ``[B, min(k, n)]`` int64 item indices.
    """
    batch, n = scores.shape
    k = min(int(k), n)
    if k == 0 or batch == 0:
        return np.zeros((batch, k), dtype=np.int64)
    kth = np.partition(scores, n - k, axis=1)[:, n - k][:, None]  # each row's k-th best score
    above = scores > kth
    tied = scores == kth
    # Of the items tied at the k-th score, keep the lowest-indexed ones that still fit.
    room = k - above.sum(axis=1, keepdims=True)
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))
    items = np.nonzero(chosen)[1].reshape(batch, k)  # exactly k per row, ascending index
    order = np.argsort(-np.take_along_axis(scores, items, axis=1), axis=1, kind="stable")
    return np.take_along_axis(items, order, axis=1)


def ranking_metrics(
    scores: np.ndarray, relevant: Sequence[np.ndarray], ks: Sequence[int], hitrate_k: int = HITRATE_K
) -> dict[str, np.ndarray]:
    """Per-user ranking metrics of one batch of already-masked scores.

    Items are ranked by score, ties by lower item index (the order of :func:`top_k_items`).
    With ``R`` the user's relevant items and ``hits_i`` = 1 when rank ``i`` is relevant:

    * ``recall@k`` = ``sum(hits_1..k) / |R|``;
    * ``ndcg@k`` = ``sum(hits_i / log2(i + 1)) / sum_{i <= min(|R|, k)} 1 / log2(i + 1)``;
    * ``hitrate@<hitrate_k>`` = 1 if any of the top ``hitrate_k`` is relevant;
    * ``mrr`` = ``1 / rank`` of the best relevant item over the full ranking, where rank is
      1 + the unmasked items scoring strictly higher + those tied with it at a lower index
      (no full sort needed).

    Args:
        scores: ``[B, n]`` scores, masked items (padding, earlier splits) at ``-inf``.
        relevant: ``B`` int arrays, each user's relevant item indices (non-empty, distinct).
        ks: Cut-offs of recall and NDCG.
        hitrate_k: Cut-off of the hit rate.

    Returns:
        ``{"recall@k": [B], ..., "ndcg@k": [B], ..., "hitrate@<hitrate_k>": [B], "mrr": [B]}``,
        float64 arrays.

    Raises:
        ValueError: On a shape mismatch, a user without relevant items, an item index out of
            range, NaN scores or a cut-off below 1.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != len(relevant):
        raise ValueError(f"scores must be [B, n] with B = len(relevant) = {len(relevant)}, got shape {scores.shape}")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1 or hitrate_k < 1:
        raise ValueError(f"cut-offs must be >= 1, got ks={ks}, hitrate_k={hitrate_k}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    batch, n = scores.shape
    lengths = np.array([len(r) for r in relevant], dtype=np.int64)
    if (lengths == 0).any():
        raise ValueError(f"users at batch rows {np.flatnonzero(lengths == 0).tolist()} have no relevant items")
    rows = np.repeat(np.arange(batch), lengths)
    items = np.concatenate([np.asarray(r, dtype=np.int64) for r in relevant]) if batch else np.zeros(0, np.int64)
    if items.size and (items.min() < 0 or items.max() >= n):
        raise ValueError(f"relevant item indices must be in [0, {n}), got min {items.min()}, max {items.max()}")
    is_relevant = np.zeros((batch, n), dtype=bool)
    is_relevant[rows, items] = True

    max_k = max(max(ks), hitrate_k)
    top = top_k_items(scores, max_k)
    hits = np.take_along_axis(is_relevant, top, axis=1).astype(np.float64)  # [B, min(max_k, n)]
    discount = 1.0 / np.log2(np.arange(2, max_k + 2))  # rank i (1-based) -> 1 / log2(i + 1)
    ideal = np.cumsum(discount)  # ideal[m - 1]: DCG of m hits at the top

    metrics: dict[str, np.ndarray] = {}
    for k in ks:
        metrics[f"recall@{k}"] = hits[:, :k].sum(axis=1) / lengths
    for k in ks:
        dcg = hits[:, :k] @ discount[: hits[:, :k].shape[1]]
        metrics[f"ndcg@{k}"] = dcg / ideal[np.minimum(lengths, k) - 1]
    metrics[f"hitrate@{hitrate_k}"] = (hits[:, :hitrate_k].sum(axis=1) > 0).astype(np.float64)

    best = np.where(is_relevant, scores, -np.inf).max(axis=1, keepdims=True)
    best_item = np.argmax(is_relevant & (scores == best), axis=1)[:, None]  # lowest index among the best
    unmasked = scores > -np.inf
    ahead = (scores > best) | ((scores == best) & (np.arange(n) < best_item) & unmasked)
    metrics["mrr"] = 1.0 / (1.0 + ahead.sum(axis=1))
    return metrics


# ----------------------------------------------------------------------------- evaluation


def evaluate_scorer(
    scorer: Scorer, features_dir: str | Path, split: str = "test", cfg: EvalConfig = EvalConfig()
) -> dict[str, float | int]:
    """Full-ranking evaluation of a scorer on one split.

    Every user with at least one interaction in ``split`` is evaluated over all items.
    Masked (set to ``-inf``, so they neither count nor push relevant items down): the
    padding index 0 and every item the user had in an *earlier* split -- for
    ``split="test"`` the train and validation items, for ``split="validation"`` the train
    items. Items of later splits stay candidates. The relevant items are the user's items
    in ``split``. Users are scored ``cfg.batch_size`` at a time, so memory is bounded by
    ``batch_size x num_items`` scores.

    Args:
        scorer: Scores ``[B, num_items]`` for a batch of ``user_idx``.
        features_dir: A published feature partition (``.../ds=<ds>``).
        split: ``"train"``, ``"validation"`` or ``"test"``.
        cfg: ``ks`` and ``batch_size``.

    Returns:
        ``recall@k`` and ``ndcg@k`` for each ``k`` in ``cfg.ks``, ``hitrate@10``, ``mrr``
        (averaged over users), ``coverage@10`` (distinct unmasked items in any user's top
        10 / ``num_items - 1`` real items) and ``users`` (how many were evaluated).

    Raises:
        ValueError: On an unknown split, a split without interactions, item indices outside
            the scorer's range, or scores of the wrong shape or with NaN.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if cfg.batch_size < 1:
        raise ValueError(f"evaluate.batch_size must be >= 1, got {cfg.batch_size}")
    started = time.perf_counter()
    users, items = load_split_pairs(features_dir, split)
    if not len(users):
        raise ValueError(f"no {split} interactions under {features_dir}")
    earlier = [load_split_pairs(features_dir, s) for s in SPLITS[: SPLITS.index(split)]]
    seen_users = np.concatenate([u for u, _ in earlier] + [np.zeros(0, np.int32)])
    seen_items = np.concatenate([i for _, i in earlier] + [np.zeros(0, np.int32)])
    num_items = int(scorer.num_items)
    all_items = np.concatenate([items, seen_items])
    if all_items.min() < 1 or all_items.max() >= num_items:
        raise ValueError(
            f"item_idx in the features spans [{all_items.min()}, {all_items.max()}] but the scorer scores "
            f"indices [1, {num_items}): the scorer was built for a different item vocabulary"
        )
    n_users = int(max(users.max(), seen_users.max(initial=0))) + 1
    relevant_ptr, relevant_items = _group_by_user(users, items, n_users)
    seen_ptr, seen_by_user = _group_by_user(seen_users, seen_items, n_users)
    eval_users = np.flatnonzero(np.diff(relevant_ptr)).astype(np.int32)

    totals: dict[str, float] = {}
    covered = np.zeros(num_items, dtype=bool)
    for start in range(0, len(eval_users), cfg.batch_size):
        batch = eval_users[start : start + cfg.batch_size]
        scores = np.array(scorer.score(batch), dtype=np.float32)  # a writable copy
        if scores.shape != (len(batch), num_items):
            raise ValueError(f"scorer returned shape {scores.shape}, expected {(len(batch), num_items)}")
        scores[:, 0] = -np.inf
        mask_rows, mask_items = _rows_of(seen_ptr, seen_by_user, batch)
        scores[mask_rows, mask_items] = -np.inf
        relevant = [relevant_items[relevant_ptr[u] : relevant_ptr[u + 1]] for u in batch]
        for name, values in ranking_metrics(scores, relevant, cfg.ks, HITRATE_K).items():
            totals[name] = totals.get(name, 0.0) + float(values.sum())
        top = top_k_items(scores, COVERAGE_K)
        covered[top[np.take_along_axis(scores, top, axis=1) > -np.inf]] = True

    result: dict[str, float | int] = {name: total / len(eval_users) for name, total in totals.items()}
    result[f"coverage@{COVERAGE_K}"] = float(covered[1:].sum()) / (num_items - 1)
    result["users"] = int(len(eval_users))
    log.info(
        "evaluate %s: %d users x %d items in %.1f s; %s", split, len(eval_users), num_items - 1,
        time.perf_counter() - started, ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "users"),
    )
    return result


def _group_by_user(users: np.ndarray, items: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR grouping: items of user ``u`` are ``values[ptr[u]:ptr[u + 1]]``, ascending.

    Returns:
        ``ptr`` ``[n_users + 1]`` and ``values`` ``[len(items)]``.
    """
    order = np.lexsort((items, users))
    ptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=n_users), out=ptr[1:])
    return ptr, items[order].astype(np.int64)


def _rows_of(ptr: np.ndarray, values: np.ndarray, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(batch row, item) pairs of every item the batch's users hold in a CSR grouping."""
    starts = ptr[batch]
    lengths = ptr[batch + 1] - starts
    rows = np.repeat(np.arange(len(batch)), lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows, values[np.repeat(starts, lengths) + offsets]


# ----------------------------------------------------------------------------- cost measures


def count_trainable_params(model: Any) -> int:
    """Sum of the sizes of ``model.trainable_variables`` (a Keras model or ``tf.Module``)."""
    return int(sum(int(np.prod(v.shape)) for v in model.trainable_variables))


def directory_bytes(path: str | Path) -> int:
    """Total bytes of the files under ``path`` (e.g. a SavedModel directory).

    Raises:
        FileNotFoundError: If ``path`` is not a directory.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    return sum(os.path.getsize(Path(root) / name) for root, _, files in os.walk(path) for name in files)


def measure_latency(saved_model_dir: str | Path, user_ids: np.ndarray, cfg: EvalConfig) -> dict[str, float | int]:
    """Latency of batched top-K queries against a retrieval SavedModel.

    The SavedModel's call function takes a ``[B]`` string tensor of user ids and returns
    ``(scores [B, K], item_ids [B, K])``, as a TFRS ``BruteForce`` index saved with
    ``tf.saved_model.save`` does. Batches of ``cfg.latency_batch_size`` ids cycle through
    ``user_ids``; after :data:`LATENCY_WARMUP_CALLS` untimed calls, ``cfg.latency_repeats``
    calls are timed, each until both outputs are on the host as numpy arrays.

    This function does not touch TensorFlow's thread settings: the caller fixes them once,
    before TensorFlow starts (e.g. ``tf.config.threading.set_intra_op_parallelism_threads``),
    so every model is measured under the same limits.

    Args:
        saved_model_dir: Directory written by ``tf.saved_model.save``.
        user_ids: ``[n]`` user ids (strings), n >= 1.
        cfg: ``latency_batch_size`` and ``latency_repeats``.

    Returns:
        ``latency_ms_p50`` and ``latency_ms_p99`` (per batch call), ``throughput_users_per_s``
        (batch size / median latency) and ``batch_size``.

    Raises:
        ValueError: On empty ids, non-positive batch size or repeats, a SavedModel without a
            call function, or outputs that are not two ``[B, K]`` tensors.
    """
    import tensorflow as tf

    ids = np.asarray(user_ids).astype(str)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"user_ids must be a non-empty 1-D array, got shape {ids.shape}")
    batch_size, repeats = int(cfg.latency_batch_size), int(cfg.latency_repeats)
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"latency_batch_size and latency_repeats must be >= 1, got {batch_size} and {repeats}")
    model = tf.saved_model.load(str(saved_model_dir))
    if not callable(model):
        raise ValueError(f"the SavedModel at {saved_model_dir} has no call function (save the index layer or model itself)")

    # Batches are built before timing so the clock sees only the model call.
    calls = LATENCY_WARMUP_CALLS + repeats
    batches = [tf.constant(ids[(np.arange(batch_size) + i * batch_size) % len(ids)]) for i in range(calls)]
    timings_ms = []
    outputs = None
    for i, batch in enumerate(batches):
        started = time.perf_counter()
        outputs = model(batch)
        arrays = [t.numpy() for t in outputs] if isinstance(outputs, (tuple, list)) else None
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        if i == 0:
            _check_topk_outputs(arrays, batch_size, saved_model_dir)
        if i >= LATENCY_WARMUP_CALLS:
            timings_ms.append(elapsed_ms)

    p50, p99 = (float(v) for v in np.percentile(timings_ms, [50, 99]))
    result = {
        "latency_ms_p50": p50,
        "latency_ms_p99": p99,
        "throughput_users_per_s": batch_size / (p50 / 1000.0),
        "batch_size": batch_size,
    }
    log.info("latency %s: batch %d, p50 %.2f ms, p99 %.2f ms, %.0f users/s (%d timed calls)",
             saved_model_dir, batch_size, p50, p99, result["throughput_users_per_s"], repeats)
    return result


def _check_topk_outputs(arrays: list[np.ndarray] | None, batch_size: int, where: str | Path) -> None:
    if arrays is None or len(arrays) != 2 or any(a.ndim != 2 or a.shape[0] != batch_size for a in arrays):
        shapes = None if arrays is None else [a.shape for a in arrays]
        raise ValueError(
            f"the SavedModel at {where} must return (scores [B, K], item_ids [B, K]) for B = {batch_size}, got shapes {shapes}"
        )


# ============================================================================= CLI
# The command-line entry point (`python -m pipeline.evaluate ...`, `main()`) goes below this
# line. It trains nothing: it loads the features and models and calls the functions above.


class SavedModelScorer:
    """Scores every item of today's vocabulary with an exported retrieval SavedModel.

    Evaluates the artefact that would be served: its query model (behind its own user-id
    lookup) and its brute-force index of item embeddings, matched to today's item ids by
    string. Items the model does not know score ``-inf``; a champion trained on an older
    vocabulary is thus judged on today's split like everyone else.
    """

    def __init__(self, saved_model_dir: str | Path, user_ids: np.ndarray, item_ids: np.ndarray) -> None:
        import pipeline  # noqa: F401
        import tensorflow as tf

        self._tf = tf
        self.model = tf.saved_model.load(str(saved_model_dir))
        # The tfrs BruteForce layer keeps its index as these two tracked variables.
        vectors = self.model._candidates.numpy()
        position = {item: row for row, item in enumerate(self.model._identifiers.numpy().astype(str))}
        rows = np.array([position.get(str(item), -1) for item in item_ids])
        self.known = rows >= 0
        self.item_vectors = np.zeros((len(item_ids), vectors.shape[1]), np.float32)
        self.item_vectors[self.known] = vectors[rows[self.known]]
        self.user_ids = np.asarray(user_ids).astype(str)
        self.num_items = len(item_ids)

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        queries = self.model.query_model(self._tf.constant(self.user_ids[user_idx])).numpy()
        scores = queries @ self.item_vectors.T
        scores[:, ~self.known] = -np.inf
        return scores.astype(np.float32)


def _limit_tf_threads(threads: int = 2) -> None:
    import pipeline  # noqa: F401
    import tensorflow as tf

    try:  # only possible before TensorFlow runs its first op
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass


def evaluate_run(ds: str, paths, cfg, teacher_dir: str | Path, student_dir: str | Path,
                 plain_student_dir: str | Path | None = None, champion_dir: str | Path | None = None,
                 seed: int | None = None, spark: Any = None, baselines: bool = True, latency: bool = True) -> dict:
    """Evaluate teacher, student(s), champion and baselines on the same test split.

    Args:
        ds: Logical date of the features.
        paths: :class:`pipeline.config.DataPaths`.
        cfg: :class:`pipeline.config.PipelineConfig`.
        teacher_dir, student_dir, plain_student_dir: Model directories
            (``saved_model/`` and ``metadata.json`` inside).
        champion_dir: A registry version directory (TF Serving layout), if there is a champion.
        seed: ALS seed (default ``cfg.train.seed``).
        spark: A Spark session for ALS (one is started when None).
        baselines: Also score MostPopular and ALS.
        latency: Time batched top-K queries of the exported models, side by side.

    Returns:
        ``{"split": "test", "users": n, "models": {name: metrics + costs}}``.
    """
    from pipeline.features import feature_partition, load_user_table, read_manifest

    _limit_tf_threads()
    features_dir = feature_partition(paths.features, ds)
    users = load_user_table(features_dir, read_manifest(features_dir)["config"]["history_length"])
    items = load_item_table(features_dir)
    exported = {"teacher": Path(teacher_dir), "student_kd": Path(student_dir)}
    if plain_student_dir:
        exported["student_plain"] = Path(plain_student_dir)
    models: dict[str, dict] = {}
    for name, directory in exported.items():
        saved_model = directory / "saved_model"
        metrics = evaluate_scorer(SavedModelScorer(saved_model, users.user_ids, items.item_ids), features_dir, "test", cfg.evaluate)
        meta = _read_json(directory / "metadata.json")
        models[name] = {**metrics, "trainable_params": meta.get("trainable_params"), "saved_model_bytes": directory_bytes(saved_model)}
    if champion_dir:
        champion_dir = Path(champion_dir)
        models["champion"] = {
            **evaluate_scorer(SavedModelScorer(champion_dir, users.user_ids, items.item_ids), features_dir, "test", cfg.evaluate),
            "version": int(champion_dir.name) if champion_dir.name.isdigit() else str(champion_dir),
        }
    if baselines:
        models["most_popular"] = evaluate_scorer(MostPopularScorer.from_features(features_dir), features_dir, "test", cfg.evaluate)
        models["als"] = evaluate_scorer(fit_als(features_dir, cfg.evaluate, cfg.train.seed if seed is None else seed, spark),
                                        features_dir, "test", cfg.evaluate)
    if latency:
        sample = users.user_ids[1:]
        for _ in range(2):  # two interleaved rounds, the second (warm) one is kept
            for name, directory in exported.items():
                models[name].update(measure_latency(directory / "saved_model", sample, cfg.evaluate))
    log.info("test metrics:\n%s", format_table(models))
    return {"split": "test", "users": int(next(iter(models.values()))["users"]), "models": models}


def format_table(models: dict[str, dict], columns: Sequence[str] = ("ndcg@10", "recall@20", "recall@10", "ndcg@20", "hitrate@10", "mrr", "coverage@10")) -> str:
    """A fixed-width table of the models' metrics, for logs."""
    header = f"{'model':14}" + "".join(f"{c:>12}" for c in columns) + f"{'params':>10}{'p50 ms':>9}"
    lines = [header]
    order = ["teacher", "student_kd", "student_plain", "champion", "als", "most_popular"]
    for name, row in sorted(models.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)):
        values = "".join(f"{row[c]:12.4f}" if isinstance(row.get(c), float) else f"{'-':>12}" for c in columns)
        params = f"{row['trainable_params']:>10,}" if row.get("trainable_params") else f"{'-':>10}"
        latency = f"{row['latency_ms_p50']:9.1f}" if row.get("latency_ms_p50") else f"{'-':>9}"
        lines.append(f"{name:14}{values}{params}{latency}")
    return "\n".join(lines)


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def _step(ds: str, paths, cfg) -> dict:
    from pipeline.distill import latest_model

    return evaluate_run(ds, paths, cfg, latest_model(paths, "teacher", ds), latest_model(paths, "student", ds),
                        latest_model(paths, "student_plain", ds, required=False))


def main(argv=None) -> int:
    from pipeline import cli

    return cli.run_step(_step, "Evaluate teacher, student and baselines on the test split.", argv)


if __name__ == "__main__":
    raise SystemExit(main())
