"""Ranking metrics of one batch of already-masked scores: pure numpy, checkable by hand."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.config import COVERAGE_K, HITRATE_K  # noqa: F401  (COVERAGE_K re-exported; the config owns both so the gate bounds know which metrics exist)


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
