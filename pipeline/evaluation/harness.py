"""The evaluation harness: full-ranking evaluation of any scorer on one split of a feature set."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from pipeline.config import EvalConfig
from pipeline.evaluation.metrics import COVERAGE_K, HITRATE_K, ranking_metrics, top_k_items
from pipeline.evaluation.scorers import Scorer
from pipeline.features import SPLITS, load_split_pairs

log = logging.getLogger(__name__)


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
