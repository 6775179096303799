"""The serving index: faiss over a model's exported item vectors, chosen and tuned when it is exported.

Small catalogues get an exact ``IndexFlatIP``; above ``serving.ann_exact_max_items`` items an
``IndexIVFFlat`` (inner product) whose ``nprobe`` is the fewest lists (of 1, 2, 3, 4, 6, 8, ...) that reach
``serving.ann_target_recall`` recall@100 against exact search on the validation users'
query vectors. The record of what was built (kind, lists, probes, the recall measured, size,
faiss version) is stored beside the index, so the registry and the model's metadata can say
what is served.

Layout of a saved index directory (written atomically, no pickle)::

    items.faiss    the faiss index (faiss.write_index); row r is item_ids[r]
    item_ids.npy   [n] unicode item ids
    index.json     the record
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np

from pipeline.config import ServingConfig
from pipeline.io import fsync_tree, publish_dir, temp_dir, write_json

INDEX_FILE = "items.faiss"
ITEM_IDS_FILE = "item_ids.npy"
RECORD_FILE = "index.json"
# Every known user's query vector, computed at export: the exported query tower's answer for a
# user id is fixed until the next export (its history is baked in), so serving looks it up.
USER_IDS_FILE = "user_ids.npy"
USER_VECTORS_FILE = "user_vectors.npy"
# The serving index's directory inside a model's directory and inside a registry version.
SERVING_INDEX_DIR = "serving_index"
# Results per query whose recall the record states (and nprobe is tuned for): what is served.
RECALL_K = 100


class SavedIndex(NamedTuple):
    """A loaded serving index: ``index`` row ``r`` is item ``item_ids[r]``; ``record`` says what it is."""

    index: faiss.Index
    item_ids: np.ndarray
    record: dict
    user_ids: np.ndarray | None = None  # [u] the users whose query vectors were computed at export
    user_vectors: np.ndarray | None = None  # [u, d] float32, memory-mapped


def auto_nlist(num_items: int) -> int:
    """``4 * sqrt(items)`` lists (faiss's rule of thumb for IVF), at least 1 and at most one per item."""
    return max(1, min(num_items, round(4 * math.sqrt(num_items))))


def exact_top_k(item_vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top ``k`` by inner product, in numpy: ``(scores [m, k], rows [m, k])``, best first."""
    scores = queries @ item_vectors.T  # [m, n]
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    rows = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(scores, rows, axis=1), rows


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over rows of the share of ``exact [m, k]``'s entries that ``found [m, k]`` holds too."""
    hits = [len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact)]
    return float(np.mean(hits) / exact.shape[1])


def build_serving_index(item_vectors: np.ndarray, item_ids: np.ndarray, probe_queries: np.ndarray,
                        cfg: ServingConfig) -> tuple[faiss.Index, dict]:
    """An exact or IVF faiss index over ``item_vectors``, and the record of what was built.

    Exact (``IndexFlatIP``) up to ``cfg.ann_exact_max_items`` items. Its default, 5,000,
    comes from timing both kinds on this project's 2-core machine (faiss 1.15.1, 2 threads,
    top 100 per query, batches of 256 queries, median of 35 interleaved batches; clustered
    unit vectors, IVF at 4 sqrt(n) lists probing what reaches recall@100 0.95; the machine
    was shared, so read the ratios rather than the absolute numbers)::

        items    d=32 exact / IVF users/s (IVF gain)    d=128 exact / IVF users/s (IVF gain)
        1,000        17,100 / 23,800 (1.4x)                 20,300 / 23,900 (1.2x)
        2,000        21,300 / 23,600 (1.1x)                 16,000 / 25,300 (1.6x)
        5,000        15,300 / 22,600 (1.5x)                  9,100 / 23,200 (2.5x)
        10,000        6,800 / 14,600 (2.2x)                  4,300 / 25,800 (5.9x)
        20,000        4,700 / 15,400 (3.3x)                  2,900 / 31,700 (11x)
        50,000        3,000 / 13,300 (4.4x)                    900 / 17,300 (20x)

    Up to 5,000 items exact search serves over 9,000 users/s at either width and IVF
    gains at most 2.5x while losing up to 5% of the top 100; from 10,000 items it gains
    2-20x. (ML-100K's 1,682 items are served exactly.)

    Above it, ``IndexIVFFlat`` with ``cfg.ann_nlist`` lists (0: :func:`auto_nlist`), its
    k-means seeded with ``cfg.seed``; ``nprobe`` is the smallest of :func:`probe_steps` (at most
    every list, which is exact) whose recall@100 against exact search on ``probe_queries``
    reaches ``cfg.ann_target_recall``.

    Args:
        item_vectors: ``[n, d]`` float32 item vectors (scores are inner products).
        item_ids: ``[n]`` their ids (only counted here; saved by :func:`save_serving_index`).
        probe_queries: ``[m, d]`` float32 query vectors of validation users, ``m >= 1``.
        cfg: The ``ann_*`` settings and ``seed``.

    Returns:
        ``(index, record)``; the record holds ``type`` (``"exact"`` or ``"ivf"``),
        ``faiss_class``, ``metric``, ``nlist`` and ``nprobe`` (None when exact),
        ``recall_at_100`` (measured on the probe queries; its k is ``recall_k``, fewer
        than 100 on a smaller catalogue), ``target_recall``, ``probe_queries``, ``items``,
        ``dim``, ``index_bytes`` and ``faiss_version``.

    Raises:
        ValueError: If the shapes disagree, or there are no items or no probe queries.
    """
    vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
    queries = np.ascontiguousarray(probe_queries, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] < 1 or len(item_ids) != vectors.shape[0]:
        raise ValueError(f"need item_vectors [n >= 1, d] and item_ids [n], got {vectors.shape} and {len(item_ids)} ids")
    if queries.ndim != 2 or queries.shape[0] < 1 or queries.shape[1] != vectors.shape[1]:
        raise ValueError(f"need probe_queries [m >= 1, {vectors.shape[1]}], got {queries.shape}")
    n, dim = vectors.shape
    k = min(RECALL_K, n)
    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    if n <= cfg.ann_exact_max_items:
        index, nlist, nprobe, recall = exact, None, None, 1.0  # exact search is its own reference
    else:
        nlist = cfg.ann_nlist or auto_nlist(n)
        if nlist > n:
            raise ValueError(f"serving.ann_nlist ({nlist}) exceeds the {n} items")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = cfg.seed  # the k-means's sample and initial centroids: the same vectors give the same lists
        index.train(vectors)
        index.add(vectors)
        nprobe, recall = _tune_nprobe(index, queries, exact.search(queries, k)[1], cfg.ann_target_recall)
    record = {
        "type": "exact" if nlist is None else "ivf", "faiss_class": type(index).__name__, "metric": "inner_product",
        "nlist": nlist, "nprobe": nprobe, "recall_at_100": recall, "recall_k": k, "target_recall": cfg.ann_target_recall,
        "probe_queries": int(queries.shape[0]), "items": int(n), "dim": int(dim),
        "index_bytes": int(faiss.serialize_index(index).nbytes), "faiss_version": faiss.__version__,
    }
    return index, record


def probe_steps(nlist: int) -> list[int]:
    """The probe depths tried, in order: 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and the
    points half-way between them, so the one chosen probes at most a third more lists than the
    target needs), then every list."""
    steps, power = [1, 2], 2
    while steps[-1] < nlist:
        steps += [power * 3 // 2, 2 * power]
        power *= 2
    return sorted({min(step, nlist) for step in steps})


def _tune_nprobe(index: faiss.IndexIVF, queries: np.ndarray, exact_rows: np.ndarray, target: float) -> tuple[int, float]:
    """The fewest lists of :func:`probe_steps` probed whose recall reaches ``target``; sets it on ``index``."""
    for nprobe in probe_steps(index.nlist):
        index.nprobe = nprobe
        recall = recall_at_k(index.search(queries, exact_rows.shape[1])[1], exact_rows)
        if recall >= target:
            break
    return nprobe, recall


def save_serving_index(directory: str | Path, index: faiss.Index, item_ids: np.ndarray, record: dict,
                       user_ids: np.ndarray | None = None, user_vectors: np.ndarray | None = None) -> Path:
    """Write ``index``, its ``item_ids`` and ``record`` to ``directory`` atomically (old or new, never a part),
    with the known users' query vectors when given (``user_ids [u]``, ``user_vectors [u, d]``).

    Returns:
        ``directory``.

    Raises:
        ValueError: If ``item_ids`` does not name every row of ``index``.
    """
    ids = np.asarray(item_ids).astype(str)  # unicode, not object: np.load needs no pickle
    if ids.ndim != 1 or len(ids) != index.ntotal:
        raise ValueError(f"need one item id per indexed row ({index.ntotal}), got shape {ids.shape}")
    if user_vectors is not None and (user_ids is None or np.shape(user_vectors) != (len(user_ids), index.d)):
        raise ValueError(f"need one {index.d}-d vector per user id, got {np.shape(user_vectors)} for "
                         f"{None if user_ids is None else len(user_ids)} ids")
    # atomic_dir without its crash points: an export writes this inside the model's own
    # atomic directory, whose "publish.before" the crash tests mean, not this one's.
    with temp_dir(directory) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        np.save(tmp / ITEM_IDS_FILE, ids, allow_pickle=False)
        if user_vectors is not None:
            np.save(tmp / USER_IDS_FILE, np.asarray(user_ids).astype(str), allow_pickle=False)
            np.save(tmp / USER_VECTORS_FILE, np.ascontiguousarray(user_vectors, dtype=np.float32), allow_pickle=False)
            record = {**record, "user_vectors": len(user_ids), "user_vectors_bytes": int(np.asarray(user_vectors).size * 4)}
        write_json(tmp / RECORD_FILE, record)
        fsync_tree(tmp)
        publish_dir(tmp, Path(directory))
    return Path(directory)


def load_serving_index(directory: str | Path) -> SavedIndex:
    """The index, item ids and record that :func:`save_serving_index` wrote to ``directory``.

    Raises:
        FileNotFoundError: If ``directory`` holds no serving index.
    """
    directory = Path(directory)
    if not (directory / INDEX_FILE).is_file():
        raise FileNotFoundError(f"{directory} holds no serving index ({INDEX_FILE})")
    index = faiss.read_index(str(directory / INDEX_FILE))
    item_ids = np.load(directory / ITEM_IDS_FILE, allow_pickle=False)
    if (directory / USER_VECTORS_FILE).is_file():
        return SavedIndex(index, item_ids, read_index_record(directory), np.load(directory / USER_IDS_FILE, allow_pickle=False),
                          np.load(directory / USER_VECTORS_FILE, mmap_mode="r", allow_pickle=False))
    return SavedIndex(index, item_ids, read_index_record(directory))


def read_index_record(directory: str | Path) -> dict:
    """The record of the serving index in ``directory``: a serving index's own directory, or a
    model's directory or a registry version holding one in ``serving_index/``.

    Raises:
        FileNotFoundError: If there is no serving index there.
    """
    directory = Path(directory)
    for candidate in (directory / RECORD_FILE, directory / SERVING_INDEX_DIR / RECORD_FILE):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise FileNotFoundError(f"{directory} holds no serving index record ({SERVING_INDEX_DIR}/{RECORD_FILE})")
