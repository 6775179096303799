"""Serving-cost measures: parameters, SavedModel bytes, batched top-K latency (through the
model's faiss serving index, :class:`pipeline.serving.ServingModel`, when it has one)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import EvalConfig
from pipeline.serving import WARMUP_CALLS, ServingModel, locate_model, serving_recall, time_top_k

log = logging.getLogger(__name__)

# Untimed calls before measuring latency (the first calls build kernels and caches): as many
# through a SavedModel as through a serving index.
LATENCY_WARMUP_CALLS = WARMUP_CALLS


def limit_tf_threads(threads: int = 2) -> None:
    """Cap TensorFlow's thread pools, so every model is timed under the same limits.

    Only possible before TensorFlow runs its first op; later calls change nothing.
    """
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass


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


# TensorFlow writes a random UUID, in decimal, into each export's fingerprint, so this file's
# size differs by a byte or two between two exports of the very same model.
SAVED_MODEL_FINGERPRINT = "fingerprint.pb"


def saved_model_bytes(path: str | Path) -> int:
    """Bytes of a SavedModel's graph, variables and assets: the same for the same model.

    Its ``fingerprint.pb`` (under 100 bytes) is left out: see :data:`SAVED_MODEL_FINGERPRINT`.

    Raises:
        FileNotFoundError: If ``path`` is not a directory.
    """
    fingerprint = Path(path) / SAVED_MODEL_FINGERPRINT
    return directory_bytes(path) - (fingerprint.stat().st_size if fingerprint.is_file() else 0)


def measure_latency(saved_model_dir: str | Path, user_ids: np.ndarray, cfg: EvalConfig) -> dict[str, float | int]:
    """Latency of batched top-K queries, as the model is served.

    A model exported with a faiss serving index (``serving_index/`` beside or inside
    ``saved_model_dir``) is timed through :class:`pipeline.serving.ServingModel` (query
    tower, then the index, top 100); one exported before is timed through its SavedModel,
    whose call function takes a ``[B]`` string tensor of user ids and returns
    ``(scores [B, K], item_ids [B, K])``, as a TFRS ``BruteForce`` index saved with
    ``tf.saved_model.save`` does. Batches of ``cfg.latency_batch_size`` ids cycle through
    ``user_ids``; after :data:`LATENCY_WARMUP_CALLS` untimed calls, ``cfg.latency_repeats``
    calls are timed, each until both outputs are on the host as numpy arrays.

    This function does not touch TensorFlow's thread settings: the caller fixes them once,
    before TensorFlow starts (e.g. ``tf.config.threading.set_intra_op_parallelism_threads``),
    so every model is measured under the same limits; faiss searches with 2 threads.

    Args:
        saved_model_dir: Directory written by ``tf.saved_model.save`` (a model's
            ``saved_model/`` or a registry version).
        user_ids: ``[n]`` user ids (strings), n >= 1.
        cfg: ``latency_batch_size`` and ``latency_repeats``.

    Returns:
        ``latency_ms_p50`` and ``latency_ms_p99`` (per batch call), ``throughput_users_per_s``
        (batch size / median latency) and ``batch_size``; through a serving index also
        ``recall_at_100`` (against exact brute force
        over the exported item vectors) and ``index_bytes``.

    Raises:
        ValueError: On empty ids, non-positive batch size or repeats, a SavedModel without a
            call function, or outputs that are not two ``[B, K]`` tensors.
    """
    ids = np.asarray(user_ids).astype(str)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"user_ids must be a non-empty 1-D array, got shape {ids.shape}")
    batch_size, repeats = int(cfg.latency_batch_size), int(cfg.latency_repeats)
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"latency_batch_size and latency_repeats must be >= 1, got {batch_size} and {repeats}")
    if _has_serving_index(saved_model_dir):
        result = _measure_served(saved_model_dir, ids, batch_size, repeats)
    else:
        result = _measure_saved_model(saved_model_dir, ids, batch_size, repeats)
    log.info("latency %s (%s): batch %d, p50 %.2f ms, p99 %.2f ms, %.0f users/s (%d timed calls)", saved_model_dir,
             "faiss index" if "index_bytes" in result else "SavedModel", batch_size, result["latency_ms_p50"],
             result["latency_ms_p99"], result["throughput_users_per_s"], repeats)
    return result


def _has_serving_index(saved_model_dir: str | Path) -> bool:
    try:
        return locate_model(saved_model_dir).serving_index is not None
    except FileNotFoundError:  # not a SavedModel at all: the SavedModel path says why
        return False


def _measure_served(saved_model_dir: str | Path, ids: np.ndarray, batch_size: int, repeats: int) -> dict[str, float | int]:
    model = ServingModel.load(saved_model_dir)
    timing = time_top_k(model, ids, batch_size, repeats)
    return {"latency_ms_p50": timing["latency_ms_p50"], "latency_ms_p99": timing["latency_ms_p99"],
            "throughput_users_per_s": timing["users_per_s"], "batch_size": batch_size,
            "recall_at_100": serving_recall(model, ids), "index_bytes": int(model.record["index_bytes"])}


def _measure_saved_model(saved_model_dir: str | Path, ids: np.ndarray, batch_size: int, repeats: int) -> dict[str, float | int]:
    """The SavedModel's own call function, for models exported before serving indexes."""
    import tensorflow as tf

    model = tf.saved_model.load(str(saved_model_dir))
    if not callable(model):
        raise ValueError(f"the SavedModel at {saved_model_dir} has no call function (save the index layer or model itself)")

    # Batches are built before timing so the clock sees only the model call.
    calls = LATENCY_WARMUP_CALLS + repeats
    batches = [tf.constant(ids[(np.arange(batch_size) + i * batch_size) % len(ids)]) for i in range(calls)]
    timings_ms = []
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
    return {"latency_ms_p50": p50, "latency_ms_p99": p99, "throughput_users_per_s": batch_size / (p50 / 1000.0),
            "batch_size": batch_size}


def _check_topk_outputs(arrays: list[np.ndarray] | None, batch_size: int, where: str | Path) -> None:
    if arrays is None or len(arrays) != 2 or any(a.ndim != 2 or a.shape[0] != batch_size for a in arrays):
        shapes = None if arrays is None else [a.shape for a in arrays]
        raise ValueError(
            f"the SavedModel at {where} must return (scores [B, K], item_ids [B, K]) for B = {batch_size}, got shapes {shapes}"
        )
