"""The evaluation harness: full-ranking evaluation of any scorer on one split of a feature set."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.config import EvalConfig
from pipeline.data.features import SPLITS, stream_user_ranges, user_index_bound
from pipeline.evaluation.metrics import COVERAGE_K, HITRATE_K, ranking_metrics, top_k_items
from pipeline.evaluation.scorers import History, Scorer

log = logging.getLogger(__name__)


def evaluate_scorer(
    scorer: Scorer, features_dir: str | Path, split: str = "test", cfg: EvalConfig = EvalConfig()
) -> dict[str, float | int]:
    """Full-ranking evaluation of a scorer on one split.

    Every user with at least one interaction in ``split`` is evaluated over all items.
    Masked (set to ``-inf``, so they neither count nor push relevant items down): the
    padding index 0 and every item the user had in an *earlier* split -- for
    ``split="test"`` the train and validation items, for ``split="validation"`` the train
    items. Those earlier interactions are also the history the scorer is given. Items of
    later splits stay candidates. The relevant items are the user's items in ``split``.

    Memory is bounded however many users there are: the interactions are streamed one
    ``user_idx`` range at a time (about ``cfg.pairs_per_chunk`` pairs, spilled to a
    temporary directory, see :func:`pipeline.data.features.stream_user_ranges`) and users are
    scored ``cfg.batch_size`` at a time (``batch_size x num_items`` scores).

    Args:
        scorer: Scores ``[B, num_items]`` for a batch of ``user_idx`` and their history.
        features_dir: A published feature partition (``.../ds=<ds>``).
        split: ``"train"``, ``"validation"`` or ``"test"``.
        cfg: ``ks``, ``batch_size`` and ``pairs_per_chunk``.

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
    num_items, position = int(scorer.num_items), SPLITS.index(split)
    totals: dict[str, float] = {}
    covered = np.zeros(num_items, dtype=bool)
    evaluated = 0
    with tempfile.TemporaryDirectory(prefix="evaluate-") as spill_dir:
        splits = SPLITS[: position + 1]
        ranges = stream_user_ranges(features_dir, splits, user_index_bound(features_dir, splits), spill_dir,
                                    cfg.pairs_per_chunk, columns=("user_idx", "item_idx", "weight", "split"))
        for pairs in ranges:
            _check_item_range(pairs["item_idx"], num_items)
            pairs = pairs[np.lexsort((pairs["item_idx"], pairs["user_idx"]))]
            relevant, seen = pairs[pairs["split"] == position], pairs[pairs["split"] < position]
            first = int(pairs["user_idx"][0])
            relevant_ptr = _user_ptr(relevant["user_idx"] - first, int(pairs["user_idx"][-1]) - first + 1)
            seen_ptr = _user_ptr(seen["user_idx"] - first, len(relevant_ptr) - 1)
            eval_users = np.flatnonzero(np.diff(relevant_ptr))
            for start in range(0, len(eval_users), cfg.batch_size):
                batch = eval_users[start : start + cfg.batch_size]
                rows, taken = _rows_of(seen_ptr, batch)
                history = History(rows, seen["item_idx"][taken].astype(np.int64), seen["weight"][taken])
                scores = np.array(scorer.score((batch + first).astype(np.int32), history), dtype=np.float32)  # writable
                if scores.shape != (len(batch), num_items):
                    raise ValueError(f"scorer returned shape {scores.shape}, expected {(len(batch), num_items)}")
                scores[:, 0] = -np.inf
                scores[history.rows, history.items] = -np.inf
                items = relevant["item_idx"].astype(np.int64)
                judged = [items[relevant_ptr[u] : relevant_ptr[u + 1]] for u in batch]
                for name, values in ranking_metrics(scores, judged, cfg.ks, HITRATE_K).items():
                    totals[name] = totals.get(name, 0.0) + float(values.sum())
                top = top_k_items(scores, COVERAGE_K)
                covered[top[np.take_along_axis(scores, top, axis=1) > -np.inf]] = True
            evaluated += len(eval_users)
    if not evaluated:
        raise ValueError(f"no {split} interactions under {features_dir}")

    result: dict[str, float | int] = {name: total / evaluated for name, total in totals.items()}
    result[f"coverage@{COVERAGE_K}"] = float(covered[1:].sum()) / (num_items - 1)
    result["users"] = int(evaluated)
    log.info(
        "evaluate %s: %d users x %d items in %.1f s; %s", split, evaluated, num_items - 1,
        time.perf_counter() - started, ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "users"),
    )
    return result


def _check_item_range(items: np.ndarray, num_items: int) -> None:
    """Raise unless every ``item_idx`` is a real item the scorer scores."""
    if len(items) and (items.min() < 1 or items.max() >= num_items):
        raise ValueError(
            f"item_idx in the features spans [{items.min()}, {items.max()}] but the scorer scores "
            f"indices [1, {num_items}): the scorer was built for a different item vocabulary"
        )


def _user_ptr(users: np.ndarray, n_users: int) -> np.ndarray:
    """CSR offsets of pairs sorted by user: user ``u``'s pairs are ``[ptr[u], ptr[u + 1])``; ``[n_users + 1]``."""
    ptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=n_users), out=ptr[1:])
    return ptr


def _rows_of(ptr: np.ndarray, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(batch row, pair position) of every pair the batch's users hold in a CSR grouping."""
    starts = ptr[batch]
    lengths = ptr[batch + 1] - starts
    rows = np.repeat(np.arange(len(batch)), lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows, np.repeat(starts, lengths) + offsets
