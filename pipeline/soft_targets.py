"""Batch soft targets: the teacher's top-K per training user, with scores and embeddings.

``python -m pipeline.soft_targets --ds ... [--config ...]`` writes, atomically, the
catalogue's soft-target directory of the teacher that the settings identify:

``users.parquet``, one row per user with train interactions, in ``user_idx`` order (the
user's known items are those of train, plus validation for a teacher refitted on both):

=========================  ===========================  =================================
column                     type                         meaning
=========================  ===========================  =================================
user_idx                   int32                        feature vocabulary index
user_id                    string                       original id
topk_item_idx              fixed_size_list<int32>[K]    teacher's top-K items, best first,
                                                        the user's known items excluded
topk_scores                fixed_size_list<float32>[K]  teacher scores (dot products)
teacher_user_embedding     fixed_size_list<float32>[D]  teacher query-tower output
=========================  ===========================  =================================

``items.parquet``: ``item_idx`` int32, ``item_id`` string, ``teacher_item_embedding``
fixed_size_list<float32>[D] for every item (the hint targets, and the teacher's score of
any sampled negative as a dot product). ``manifest.json``: teacher, K, D, row counts and
``logit_scale`` = 1 / the teacher's ``retrieval_temperature`` (its logits are scores times it).

Users are scored in batches, so memory is bounded by ``batch x items``. Scores repeat
exactly for the same teacher, so re-running writes the same rows.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from pipeline import cli
from pipeline.catalog import MANIFEST, Catalog, require
from pipeline.config import PipelineConfig
from pipeline.features import load_split_pairs
from pipeline.io import atomic_dir, write_json
from pipeline.models import embed_all, restore_teacher

log = logging.getLogger(__name__)


def _fixed_list(matrix: np.ndarray, dtype: pa.DataType) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), type=dtype), matrix.shape[1])


def user_schema(k: int, dim: int) -> pa.Schema:
    return pa.schema([
        ("user_idx", pa.int32()), ("user_id", pa.string()),
        ("topk_item_idx", pa.list_(pa.int32(), k)), ("topk_scores", pa.list_(pa.float32(), k)),
        ("teacher_user_embedding", pa.list_(pa.float32(), dim)),
    ])


def top_k_excluding(scores: np.ndarray, exclude: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` columns of each row of ``scores [batch, items]``, column 0 and ``exclude[row]`` masked.

    Ties go to the lower index, so the result is deterministic.

    Returns:
        ``(indices [batch, k], scores [batch, k])``, best first.
    """
    scores = scores.astype(np.float32, copy=True)
    scores[:, 0] = -np.inf
    for row, items in enumerate(exclude):
        scores[row, items] = -np.inf
    # Stable sort of negated scores: equal scores keep index order.
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order.astype(np.int32), np.take_along_axis(scores, order, axis=1)


def generate_soft_targets(ds: str, catalog: Catalog, cfg: PipelineConfig) -> dict:
    """Score every training user with the run's teacher and write the soft targets.

    Args:
        ds: Logical date (the features the teacher was trained on).
        catalog: Where artifacts live; the teacher is the one ``cfg`` identifies.
        cfg: Settings (``soft_targets``, and the teacher's identity).

    Returns:
        ``{"path", "teacher_version", "users", "k", "dim", "seconds"}``.

    Raises:
        ArtifactNotFound: When the teacher has not been trained.
    """
    started = time.perf_counter()
    teacher_dir, features_dir = catalog.teacher(ds, cfg), catalog.features(ds)
    model, users, items, meta = restore_teacher(teacher_dir, features_dir)
    k = min(cfg.soft_targets.top_k, items.size - 1)
    item_vectors = embed_all(model.candidate, items.size)
    # The items each user is known to have had when the teacher last trained are excluded.
    known = ("train", "validation") if meta["config"]["training"].get("refit") else ("train",)
    pairs = [load_split_pairs(features_dir, split) for split in known]
    train_users, train_items = np.concatenate([u for u, _ in pairs]), np.concatenate([i for _, i in pairs])
    order = np.argsort(train_users, kind="stable")
    train_users, train_items = train_users[order], train_items[order]
    user_list = np.unique(train_users)
    bounds = np.searchsorted(train_users, user_list), np.searchsorted(train_users, user_list, side="right")
    starts = dict(zip(user_list.tolist(), zip(*bounds)))
    dim = item_vectors.shape[1]
    batch_size = cfg.soft_targets.batch_size
    out = catalog.soft_targets(ds, cfg)
    with atomic_dir(out) as tmp:
        with pq.ParquetWriter(tmp / "users.parquet", user_schema(k, dim)) as writer:
            for first in range(0, len(user_list), batch_size):
                batch = user_list[first: first + batch_size]
                user_vectors = model.query(tf.constant(batch), training=False).numpy()
                seen = [train_items[slice(*starts[u])] for u in batch.tolist()]
                top_idx, top_scores = top_k_excluding(user_vectors @ item_vectors.T, seen, k)
                writer.write_table(pa.Table.from_arrays([
                    pa.array(batch, pa.int32()), pa.array(users.user_ids[batch].astype(str), pa.string()),
                    _fixed_list(top_idx, pa.int32()), _fixed_list(top_scores, pa.float32()),
                    _fixed_list(user_vectors.astype(np.float32), pa.float32()),
                ], schema=user_schema(k, dim)))
                log.info("soft targets: %d/%d users", min(first + len(batch), len(user_list)), len(user_list))
        pq.write_table(pa.Table.from_arrays([
            pa.array(np.arange(items.size), pa.int32()), pa.array(items.item_ids.astype(str), pa.string()),
            _fixed_list(item_vectors.astype(np.float32), pa.float32()),
        ], names=["item_idx", "item_id", "teacher_item_embedding"]), tmp / "items.parquet")
        logit_scale = 1.0 / float(meta["config"]["training"]["retrieval_temperature"])
        manifest = {"ds": ds, "teacher_version": meta["version"], "teacher_dir": str(teacher_dir), "k": k, "dim": int(dim),
                    "logit_scale": logit_scale,
                    "users": int(len(user_list)), "items": int(items.size), "features": str(features_dir)}
        write_json(tmp / MANIFEST, manifest)
    seconds = round(time.perf_counter() - started, 2)
    log.info("wrote soft targets for %d users (K=%d) to %s in %.1fs", len(user_list), k, out, seconds)
    return {"path": str(out), "teacher_version": meta["version"], "users": int(len(user_list)), "k": k, "dim": int(dim), "seconds": seconds}


def read_soft_targets(path: str | Path, num_users: int, num_items: int) -> dict[str, np.ndarray]:
    """Load soft targets into dense tables indexed by ``user_idx`` / ``item_idx``.

    Returns:
        ``topk_item_idx [num_users, K]``, ``topk_scores [num_users, K]``,
        ``user_embedding [num_users, D]``, ``item_embedding [num_items, D]`` and
        ``has_targets [num_users]`` (False for users without train interactions).
    """
    path = require(Path(path), MANIFEST, "soft targets", "run soft_targets first")
    manifest = json.loads((path / MANIFEST).read_text())
    k, dim = manifest["k"], manifest["dim"]
    table = pq.read_table(path / "users.parquet")
    rows = table.column("user_idx").to_numpy()

    def matrix(name: str, width: int) -> np.ndarray:
        return table.column(name).combine_chunks().flatten().to_numpy().reshape(-1, width)

    out = {
        "topk_item_idx": np.zeros((num_users, k), np.int32), "topk_scores": np.zeros((num_users, k), np.float32),
        "user_embedding": np.zeros((num_users, dim), np.float32), "has_targets": np.zeros(num_users, bool),
    }
    out["topk_item_idx"][rows] = matrix("topk_item_idx", k)
    out["topk_scores"][rows] = matrix("topk_scores", k)
    out["user_embedding"][rows] = matrix("teacher_user_embedding", dim)
    out["has_targets"][rows] = True
    out["logit_scale"] = float(manifest["logit_scale"])
    items = pq.read_table(path / "items.parquet")
    out["item_embedding"] = np.zeros((num_items, dim), np.float32)
    out["item_embedding"][items.column("item_idx").to_numpy()] = items.column("teacher_item_embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return out


def main(argv=None) -> int:
    return cli.run_step(generate_soft_targets, "Write the teacher's batch soft targets to Parquet.", argv)


if __name__ == "__main__":
    raise SystemExit(main())
