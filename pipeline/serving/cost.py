"""What serving a model costs and how exact it is: latency per batch, users/s, recall, index bytes."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.serving.index import RECALL_K, exact_top_k, recall_at_k
from pipeline.serving.model import ServingModel

log = logging.getLogger(__name__)

# Untimed calls before timing: the first calls build TensorFlow's kernels and faiss's buffers.
WARMUP_CALLS = 3
# Most users whose exact top 100 (a [users, items] score matrix) the recall is measured on.
RECALL_USERS = 1_000


def time_top_k(model: ServingModel, user_ids: np.ndarray, batch_size: int, rounds: int, k: int = RECALL_K) -> dict[str, float]:
    """Time ``rounds`` calls of ``model.top_k`` on batches of ``batch_size`` ids cycled from ``user_ids``.

    Batches are cut before the clock starts; each call is timed from the ids to the
    ``(scores, item_ids)`` numpy arrays, after :data:`WARMUP_CALLS` untimed calls.

    Returns:
        ``latency_ms_p50`` and ``latency_ms_p99`` per call, and ``users_per_s`` (batch size /
        median latency).

    Raises:
        ValueError: On empty ids or a batch size or rounds below 1.
    """
    ids = np.asarray(user_ids).astype(str)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"user_ids must be a non-empty 1-D array, got shape {ids.shape}")
    if batch_size < 1 or rounds < 1:
        raise ValueError(f"batch size and rounds must be >= 1, got {batch_size} and {rounds}")
    batches = [ids[(np.arange(batch_size) + i * batch_size) % len(ids)] for i in range(WARMUP_CALLS + rounds)]
    timings_ms = []
    for i, batch in enumerate(batches):
        started = time.perf_counter()
        model.top_k(batch, k)
        if i >= WARMUP_CALLS:
            timings_ms.append((time.perf_counter() - started) * 1000.0)
    p50, p99 = (float(v) for v in np.percentile(timings_ms, [50, 99]))
    return {"latency_ms_p50": p50, "latency_ms_p99": p99, "users_per_s": batch_size / (p50 / 1000.0)}


def serving_recall(model: ServingModel, user_ids: np.ndarray, k: int = RECALL_K) -> float:
    """Recall@``k`` of the served top ``k`` against exact brute force over the model's exported
    item vectors (its SavedModel's ``item_vectors``), on up to :data:`RECALL_USERS` distinct users."""
    ids = np.unique(np.asarray(user_ids).astype(str))[:RECALL_USERS]
    exported_ids = model.saved_model.item_ids.numpy().astype(str)
    _, rows = exact_top_k(model.saved_model.item_vectors.numpy(), model.query_vectors(ids), k)
    return recall_at_k(model.top_k(ids, k)[1], exported_ids[rows])


def measure_serving(model_dir: str | Path, user_ids: np.ndarray, batch_sizes: Sequence[int] = (1, 256), rounds: int = 30,
                    k: int = RECALL_K, threads: int = 2) -> dict:
    """Latency, throughput and exactness of serving the model at ``model_dir`` through :class:`ServingModel`.

    Args:
        model_dir: A model's directory or a registry version.
        user_ids: ``[n]`` user ids the batches cycle through (and the recall is measured on).
        batch_sizes: Users per call; each is timed for ``rounds`` calls.
        rounds: Timed calls per batch size.
        k: Items per user.
        threads: faiss threads.

    Returns:
        ``{"index": the index record, "index_bytes", "recall_at_100" (against exact brute force;
        at ``k``), "k", "batches": {batch size: {"latency_ms_p50", "latency_ms_p99", "users_per_s"}}}``.

    Raises:
        FileNotFoundError: If the model has no serving index.
        ValueError: On empty ids or a batch size or rounds below 1.
    """
    model = ServingModel.load(model_dir, threads)
    result = {"index": model.record, "index_bytes": int(model.record["index_bytes"]), "k": k,
              "recall_at_100": serving_recall(model, user_ids, k),
              "batches": {int(size): time_top_k(model, user_ids, int(size), rounds, k) for size in batch_sizes}}
    for size, timing in result["batches"].items():
        log.info("serving %s (%s index): batch %d, p50 %.2f ms, p99 %.2f ms, %.0f users/s", model_dir, model.record["type"],
                 size, timing["latency_ms_p50"], timing["latency_ms_p99"], timing["users_per_s"])
    return result
