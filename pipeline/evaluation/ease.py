"""The EASE baseline (Steck 2019, "Embarrassingly Shallow Autoencoders"): an item-item model in closed form.

With the binary user-item matrix ``X`` and ``P = (X^T X + l2 * I)^-1``, the item-item
weights are ``B = I - P diag(1 / diag(P))``, i.e. ``B_ij = -P_ij / P_jj`` off the diagonal
and ``diag(B) = 0``; a user's scores are ``x_u B``. Column ``j`` of ``B`` is the ridge
regression of item ``j`` on every other item, so an item never predicts itself.

``l2`` is chosen on the validation split from ``EvalConfig.ease_l2_grid`` (a train-only fit
per value, scored like every other model), then the model is fitted on the requested splits.
Everything is dense ``[n_items, n_items]`` float32, hence ``EvalConfig.ease_max_items``.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.config import EvalConfig
from pipeline.config.evaluation import EASE_SELECTION_K
from pipeline.data.features import load_item_table, stream_user_ranges, user_index_bound
from pipeline.evaluation.harness import evaluate_scorer
from pipeline.evaluation.scorers import History

log = logging.getLogger(__name__)

# Floats of B's rows a scorer gathers at once (64 MB), however long a batch's histories are.
_GATHER_FLOATS = 1 << 24


class EaseScorer:
    """Scores ``x_u B``: the sum of the item-weight rows of the items a user liked.

    The history is what every scorer is given (for test: train + validation, everything
    known before the test items), so EASE is judged on the same footing as ALS's fold-in
    and the exported towers. A liked item is one with a positive weight; the feature job
    writes each (user, item) pair once, so ``x_u`` is binary.

    Args:
        item_weights: ``[n_items, n_items]`` EASE weights ``B`` (zero diagonal; row and
            column 0, the padding, are zeros).
        l2: The regularisation ``B`` was fitted with.
        validation_ndcg: ``{l2: validation NDCG@10}`` of the grid ``l2`` was chosen from
            (empty when ``l2`` was given).
    """

    def __init__(self, item_weights: np.ndarray, l2: float, validation_ndcg: Mapping[float, float] | None = None) -> None:
        self.item_weights = np.asarray(item_weights, dtype=np.float32)
        if self.item_weights.ndim != 2 or self.item_weights.shape[0] != self.item_weights.shape[1]:
            raise ValueError(f"item_weights must be square, got shape {self.item_weights.shape}")
        self.num_items = len(self.item_weights)
        self.l2 = float(l2)
        self.validation_ndcg = dict(validation_ndcg or {})

    def score(self, user_idx: np.ndarray, history: History) -> np.ndarray:
        """``[B, num_items]`` float32: each batch row's sum of ``item_weights`` rows over its liked items."""
        scores = np.zeros((len(user_idx), self.num_items), dtype=np.float32)
        liked = history.weights > 0
        rows, items = history.rows[liked], history.items[liked]
        # x_u B with a sparse binary x_u: gathering the rows of B costs |history| x n_items,
        # a dense product n_items^2 per user. Rows ascend, so each piece sums per row at once.
        step = max(1, _GATHER_FLOATS // self.num_items)
        for start in range(0, len(rows), step):
            piece_rows, piece_items = rows[start : start + step], items[start : start + step]
            firsts = np.flatnonzero(np.r_[True, np.diff(piece_rows) != 0])
            scores[piece_rows[firsts]] += np.add.reduceat(self.item_weights[piece_items], firsts, axis=0)
        return scores


def ease_skip_reason(n_items: int, cfg: EvalConfig) -> str | None:
    """Why EASE is not fitted on a catalogue of ``n_items`` real items, or None when it is.

    Args:
        n_items: Real items (the padding index excluded).
        cfg: ``ease_max_items``.
    """
    if n_items <= cfg.ease_max_items:
        return None
    gigabytes = 4 * (n_items + 1) ** 2 / 1e9
    return (f"{n_items:,} items > evaluate.ease_max_items {cfg.ease_max_items:,}: "
            f"one items x items float32 matrix would take {gigabytes:.1f} GB")


def item_gram(features_dir: str | Path, splits: Sequence[str], n_items: int, pairs_per_chunk: int) -> np.ndarray:
    """``X^T X`` of the binary user-item matrix of ``splits``: how many users liked both items.

    Interactions are streamed one ``user_idx`` range at a time (see
    :func:`pipeline.data.features.stream_user_ranges`) and each user adds one to every pair
    of their liked items, so the work grows with the sum of squared history lengths, not
    with users x items.

    Args:
        features_dir: A published feature partition.
        splits: The interactions counted.
        n_items: Item vocabulary size (with padding).
        pairs_per_chunk: About how many interactions are held at once.

    Returns:
        ``[n_items, n_items]`` float32 counts (whole numbers, exact below 2**24 users).
    """
    gram = np.zeros((n_items, n_items), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="ease-") as spill_dir:
        ranges = stream_user_ranges(features_dir, splits, user_index_bound(features_dir, splits), spill_dir,
                                    pairs_per_chunk, columns=("user_idx", "item_idx", "weight"))
        for pairs in ranges:
            pairs = pairs[pairs["weight"] > 0]
            if not len(pairs):
                continue
            firsts = np.flatnonzero(np.r_[True, np.diff(pairs["user_idx"]) != 0])
            for items in np.split(pairs["item_idx"], firsts[1:]):
                items = np.unique(items)
                gram[np.ix_(items, items)] += 1.0
    return gram


def ease_weights(gram: np.ndarray, l2: float) -> np.ndarray:
    """EASE's closed form: ``B = I - P diag(1 / diag(P))`` with ``P = (gram + l2 * I)^-1``.

    The solve runs in ``gram``'s precision. float32 halves the memory of float64 without
    harming it: ``l2`` bounds the condition number by ``1 + largest eigenvalue / l2`` (about
    2,000 on ML-100K at ``l2`` 10), and there float32 weights differ from float64 ones by
    < 1e-7 for ``l2`` 10 to 500, with the same validation NDCG.

    Args:
        gram: ``[n, n]`` symmetric ``X^T X``. Its diagonal is raised by ``l2`` in place for the
            solve (saving a copy of ``n^2``) and restored exactly afterwards.
        l2: Ridge penalty, > 0.

    Returns:
        ``[n, n]`` weights with a zero diagonal, ``gram``'s dtype.

    Raises:
        ValueError: If ``l2`` is not > 0.
    """
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2!r}")
    diagonal = np.diagonal(gram).copy()
    np.fill_diagonal(gram, diagonal + gram.dtype.type(l2))
    try:
        weights = np.linalg.inv(gram)
    finally:
        np.fill_diagonal(gram, diagonal)
    weights /= -np.diagonal(weights).copy()  # column j divided by -P_jj (P_jj > 0: P is positive definite)
    np.fill_diagonal(weights, 0.0)
    return weights


def choose_l2(gram: np.ndarray, features_dir: str | Path, cfg: EvalConfig) -> tuple[float, dict[float, float]]:
    """The ``cfg.ease_l2_grid`` value whose fit on ``gram`` (train only) ranks validation best.

    Each candidate is scored by :func:`~pipeline.evaluation.evaluate_scorer` on the validation
    split (train items masked, the train history folded in); the test split is never read.

    Args:
        gram: ``[n_items, n_items]`` train ``X^T X`` (see :func:`item_gram`).
        features_dir: A published feature partition.
        cfg: ``ease_l2_grid``, and the harness settings.

    Returns:
        ``(l2, {l2: validation NDCG@10})``; ties go to the earlier grid value.
    """
    metric = f"ndcg@{EASE_SELECTION_K}"
    selection = dataclasses.replace(cfg, ks=(EASE_SELECTION_K,))
    ndcg: dict[float, float] = {}
    for l2 in cfg.ease_l2_grid:
        ndcg[l2] = float(evaluate_scorer(EaseScorer(ease_weights(gram, l2), l2), features_dir, "validation", selection)[metric])
    best = max(ndcg, key=lambda l2: (ndcg[l2], -cfg.ease_l2_grid.index(l2)))
    if len(ndcg) > 2 and best in (min(ndcg), max(ndcg)):
        log.warning("ease: l2 %g is at the edge of evaluate.ease_l2_grid %s; the best may lie beyond it",
                    best, list(cfg.ease_l2_grid))
    return best, ndcg


def fit_ease(features_dir: str | Path, cfg: EvalConfig, splits: tuple[str, ...] = ("train",),
             l2: float | None = None) -> EaseScorer | None:
    """Fit EASE on the ``splits`` (train; train + validation for test), ``l2`` chosen on validation.

    ``X`` is binary (a user liked an item or not), not the interaction ``weight``: the weight
    sums event weights over repeated events and is unbounded, and a few heavy pairs would
    then dominate ``X^T X`` and move the scale ``l2`` acts on from one data set to the next.

    Args:
        features_dir: A published feature partition (``.../ds=<ds>``).
        cfg: ``ease_max_items``, ``ease_l2_grid``, ``pairs_per_chunk`` and the harness settings.
        splits: The interactions it learns from.
        l2: A fixed regularisation; when None it is chosen from ``cfg.ease_l2_grid`` by fitting
            on train and scoring validation (pass the chosen one to a refit to skip the grid).

    Returns:
        An :class:`EaseScorer` (``.l2`` the regularisation used), or None when the catalogue
        has more than ``cfg.ease_max_items`` items (logged with the reason).

    Raises:
        ValueError: If a given ``l2`` is not > 0.
    """
    if l2 is not None and not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2!r}")
    n_items = load_item_table(features_dir).size
    reason = ease_skip_reason(n_items - 1, cfg)
    if reason:
        log.warning("ease: skipped, %s", reason)
        return None
    validation_ndcg: dict[float, float] = {}
    if l2 is None:
        started = time.perf_counter()
        l2, validation_ndcg = choose_l2(item_gram(features_dir, ("train",), n_items, cfg.pairs_per_chunk), features_dir, cfg)
        log.info("ease: validation ndcg@%d by l2: %s; chose %g in %.1f s", EASE_SELECTION_K,
                 ", ".join(f"{value:g} -> {ndcg:.4f}" for value, ndcg in validation_ndcg.items()), l2,
                 time.perf_counter() - started)
    started = time.perf_counter()
    gram = item_gram(features_dir, splits, n_items, cfg.pairs_per_chunk)
    weights = ease_weights(gram, l2)
    log.info("ease: l2 %g on %s, %d items with interactions; fitted in %.1f s", l2, " + ".join(splits),
             int(np.count_nonzero(np.diagonal(gram))), time.perf_counter() - started)
    return EaseScorer(weights, l2, validation_ndcg)
