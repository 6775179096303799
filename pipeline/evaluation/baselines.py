"""The Spark MLlib implicit-feedback ALS baseline, scored by folding each user in from their history."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import EvalConfig
from pipeline.data.features import load_item_table
from pipeline.evaluation.scorers import History
from pipeline.spark import spark_session

log = logging.getLogger(__name__)


class FoldInScorer:
    """ALS with fixed item factors; each user's factors solved from their history when scored.

    This is Spark's own implicit-feedback user update (``ALS.computeFactors``): with the
    history ALS was fitted on it gives back the fitted user factors, so no table of every
    user's factors is collected anywhere; with a newer history (train + validation when
    scoring test) it gives ALS what the two-tower models' exported histories give them:
    everything known before the test items. Per user, with item factors ``Y``, confidence
    ``c = alpha * |weight|`` and ``n`` liked (positive-weight) interactions::

        (Y^T Y + sum_i c_i y_i y_i^T + reg * n * I) x = sum_{i liked} (1 + c_i) y_i

    Users without history get zeros (score 0 for every item).

    Args:
        item_vectors: ``[n_items, rank]`` item factors, row ``item_idx`` (row 0: zeros).
        alpha: ``als_alpha`` ALS was fitted with.
        reg: ``als_reg`` ALS was fitted with.
    """

    def __init__(self, item_vectors: np.ndarray, alpha: float, reg: float) -> None:
        self.item_vectors = np.asarray(item_vectors, dtype=np.float32)
        self.alpha, self.reg = alpha, reg
        self.num_items = len(self.item_vectors)
        items = self.item_vectors.astype(np.float64)
        self._gram = items.T @ items  # [r, r], shared by every user

    def user_vectors(self, size: int, history: History) -> np.ndarray:
        """``[size, rank]`` float32 factors of the batch rows ``0..size-1`` from their ``history``."""
        rank = self.item_vectors.shape[1]
        vectors = np.zeros((size, rank), dtype=np.float32)
        starts = np.flatnonzero(np.r_[True, np.diff(history.rows) != 0]) if len(history.rows) else []
        for start, end in zip(starts, np.r_[starts[1:], len(history.rows)]):
            weight = history.weights[start:end].astype(np.float64)
            y, confidence = self.item_vectors[history.items[start:end]].astype(np.float64), self.alpha * np.abs(weight)
            positive = weight > 0
            lhs = self._gram + (y * confidence[:, None]).T @ y + self.reg * positive.sum() * np.eye(rank)
            rhs = (y * np.where(positive, 1.0 + confidence, 0.0)[:, None]).sum(axis=0)
            vectors[history.rows[start]] = np.linalg.solve(lhs, rhs)
        return vectors

    def score(self, user_idx: np.ndarray, history: History) -> np.ndarray:
        """``[B, num_items]`` float32: the folded-in user factors against every item's."""
        return self.user_vectors(len(user_idx), history) @ self.item_vectors.T


def fit_als(features_dir: str | Path, cfg: EvalConfig, seed: int, spark: Any = None,
            splits: tuple[str, ...] = ("train",)) -> FoldInScorer:
    """Fit Spark MLlib implicit-feedback ALS on the ``splits`` (train; train + validation for test).

    The interaction ``weight`` is the implicit rating (confidence ``1 + als_alpha * weight``).
    Only the item factors leave Spark (items without factors get zeros, i.e. score 0); user
    factors are folded in from each user's history when scored (:class:`FoldInScorer`).

    Args:
        features_dir: A published feature partition (``.../ds=<ds>``).
        cfg: ``als_rank``, ``als_reg``, ``als_alpha``, ``als_iterations``.
        seed: ALS initialisation seed.
        spark: Session to use; when None a ``local[2]`` session is started and stopped.
        splits: The interactions it learns from.

    Returns:
        A :class:`FoldInScorer` over ``[n_items, als_rank]`` item factors, row = index.
    """
    features_dir = Path(features_dir)
    n_items = load_item_table(features_dir).size
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
        model = train_als_model(spark, features_dir, cfg, seed, splits)
        item_vectors = np.zeros((n_items, cfg.als_rank), dtype=np.float32)
        for row in model.itemFactors.toLocalIterator():
            item_vectors[row["id"]] = row["features"]
        log.info(
            "als: rank %d, reg %g, alpha %g, %d iterations on %s; %d items with factors; fitted in %.1f s",
            cfg.als_rank, cfg.als_reg, cfg.als_alpha, cfg.als_iterations, " + ".join(splits),
            int(np.any(item_vectors, axis=1).sum()), time.perf_counter() - started,
        )
    finally:
        if own_session:
            spark.stop()
        shutil.rmtree(checkpoints, ignore_errors=True)
    return FoldInScorer(item_vectors, cfg.als_alpha, cfg.als_reg)


def train_als_model(spark: Any, features_dir: str | Path, cfg: EvalConfig, seed: int, splits: tuple[str, ...]) -> Any:
    """The fitted ``pyspark.ml.recommendation.ALSModel`` on the interactions of ``splits``.

    The caller sets the session's checkpoint directory (ALS checkpoints every 5 iterations).
    """
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import functions as F

    interactions = (
        spark.read.parquet(str(Path(features_dir) / "interactions"))
        .where(F.col("split").isin(*splits))
        .select(F.col("user_idx").cast("int"), F.col("item_idx").cast("int"), F.col("weight").cast("float"))
    )
    als = ALS(
        implicitPrefs=True, rank=cfg.als_rank, regParam=cfg.als_reg, alpha=cfg.als_alpha, maxIter=cfg.als_iterations,
        seed=seed, userCol="user_idx", itemCol="item_idx", ratingCol="weight", coldStartStrategy="drop",
        checkpointInterval=5,
    )
    return als.fit(interactions)
