"""The Spark MLlib implicit-feedback ALS baseline, and its fold-in of newer interactions."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.config import EvalConfig
from pipeline.evaluation.scorers import EmbeddingScorer
from pipeline.features import SPLITS, load_item_table, load_split_pairs, stream_interactions
from pipeline.spark import spark_session

log = logging.getLogger(__name__)


def fit_als(features_dir: str | Path, cfg: EvalConfig, seed: int, spark: Any = None,
            splits: tuple[str, ...] = ("train",)) -> EmbeddingScorer:
    """Fit Spark MLlib implicit-feedback ALS on the ``splits`` (train; train + validation for test).

    The interaction ``weight`` is the implicit rating (confidence ``1 + als_alpha * weight``).
    Users and items without factors (never in train) get zero vectors, i.e. score 0.

    Args:
        features_dir: A published feature partition (``.../ds=<ds>``).
        cfg: ``als_rank``, ``als_reg``, ``als_alpha``, ``als_iterations``.
        seed: ALS initialisation seed.
        spark: Session to use; when None a ``local[2]`` session is started and stopped.
        splits: The interactions it learns from. Scored on test, ALS refits on train +
            validation: everything known before the test items, as the two-tower models'
            exported histories are.

    Returns:
        An :class:`EmbeddingScorer` over ``[n_users, als_rank]`` and ``[n_items, als_rank]``
        factor matrices, row = index (rows 0 are zeros).
    """
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import functions as F

    features_dir = Path(features_dir)
    n_items = load_item_table(features_dir).size
    n_users = 1 + max((int(u.max()) for u in (load_split_pairs(features_dir, s)[0] for s in SPLITS) if len(u)), default=0)

    own_session = spark is None
    if own_session:
        # ALS's iterative lineage can overflow the default JVM thread stack.
        spark = spark_session("evaluate_als", "local[2]", shuffle_partitions=4,
                              conf={"spark.ui.enabled": "false", "spark.driver.extraJavaOptions": "-Xss64m"})
    checkpoints = tempfile.mkdtemp(prefix="als-checkpoints-")
    try:
        # Checkpointing every few iterations truncates the lineage (else StackOverflowError).
        spark.sparkContext.setCheckpointDir(checkpoints)
        started = time.perf_counter()
        train = (
            spark.read.parquet(str(features_dir / "interactions"))
            .where(F.col("split").isin(*splits))
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


def fold_in_users(als: EmbeddingScorer, features_dir: str | Path, splits: tuple[str, ...], cfg: EvalConfig) -> EmbeddingScorer:
    """ALS with every user's factors solved again from the interactions of ``splits``, item factors fixed.

    This is Spark's own implicit-feedback user update (``ALS.computeFactors``), so folding
    in the train split reproduces the fitted user factors; folding in train + validation
    gives ALS what the two-tower models' exported histories give them on test: everything
    known before the test items, with parameters learned from train only. Per user, with
    item factors ``Y``, confidence ``c = alpha * weight`` and ``n`` interactions::

        (Y^T Y + sum_i c_i y_i y_i^T + reg * n * I) x = sum_i (1 + c_i) y_i

    Args:
        als: A fitted ALS scorer (its ``item_vectors`` are kept).
        features_dir: The feature partition.
        splits: Whose interactions make each user's profile.
        cfg: ``als_alpha`` and ``als_reg``, as ALS was fitted with.

    Returns:
        A scorer with the new user factors (users without interactions keep zeros).
    """
    items = als.item_vectors.astype(np.float64)
    rank = items.shape[1]
    gram = items.T @ items  # [r, r], shared by every user
    batches = [b for split in splits for b in stream_interactions(features_dir, split)]
    users = np.concatenate([b.column("user_idx").to_numpy() for b in batches]).astype(np.int64)
    rated = np.concatenate([b.column("item_idx").to_numpy() for b in batches]).astype(np.int64)
    weight = np.concatenate([b.column("weight").to_numpy() for b in batches]).astype(np.float64)
    order = np.argsort(users, kind="stable")
    users, rated, weight = users[order], rated[order], weight[order]
    vectors = np.zeros_like(als.user_vectors, dtype=np.float32)
    starts = np.flatnonzero(np.r_[True, np.diff(users) != 0])
    for start, end in zip(starts, np.r_[starts[1:], len(users)]):
        y, confidence = items[rated[start:end]], cfg.als_alpha * np.abs(weight[start:end])
        positive = weight[start:end] > 0
        lhs = gram + (y * confidence[:, None]).T @ y + cfg.als_reg * positive.sum() * np.eye(rank)
        vectors[users[start]] = np.linalg.solve(lhs, (y * np.where(positive, 1.0 + confidence, 0.0)[:, None]).sum(axis=0))
    return EmbeddingScorer(vectors, als.item_vectors)


def _factor_matrix(rows: Sequence[Any], size: int, rank: int) -> np.ndarray:
    """Spark factor rows ``(id, features)`` -> dense ``[max(size, max id + 1), rank]``, zeros elsewhere."""
    ids = np.array([r["id"] for r in rows], dtype=np.int64)
    matrix = np.zeros((max(size, int(ids.max()) + 1 if len(ids) else 0), rank), dtype=np.float32)
    if len(ids):
        matrix[ids] = np.asarray([r["features"] for r in rows], dtype=np.float32)
    return matrix
