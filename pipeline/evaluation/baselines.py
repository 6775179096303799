"""The Spark MLlib implicit-feedback ALS baseline."""

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
from pipeline.features import SPLITS, load_item_table, load_split_pairs
from pipeline.spark import spark_session

log = logging.getLogger(__name__)


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
