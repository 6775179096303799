"""Settings of the evaluation harness and of the validation gate."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

from pipeline.config.checks import _check, is_number, shown

# Fixed cut-offs of the single-number summaries (the Recall/NDCG cut-offs are EvalConfig.ks).
HITRATE_K = 10
COVERAGE_K = 10
# EASE's l2 is the EvalConfig.ease_l2_grid value with the best validation NDCG at this cut-off.
EASE_SELECTION_K = 10

# The metric families the gate may compare: ranking quality in [0, 1], higher is better.
# Coverage is left out on purpose (a random ranker covers the whole catalogue), and so are
# counts and costs (``users``, ``trainable_params``, latency): none of them says the
# student ranks well.
QUALITY_METRIC_FAMILIES = ("recall", "ndcg", "hitrate", "mrr")
_QUALITY_METRIC = re.compile(r"(recall|ndcg|hitrate)@[1-9][0-9]*|mrr")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation harness and baselines.

    Attributes:
        ks: Cut-offs of Recall and NDCG.
        batch_size: Users scored per batch.
        pairs_per_chunk: About how many interactions the harness holds at once (one
            ``user_idx`` range; see :func:`pipeline.data.features.stream_user_ranges`).
        als_rank: Spark MLlib ALS factors.
        als_reg: ALS regularisation.
        als_alpha: ALS implicit-feedback confidence scale.
        als_iterations: ALS sweeps.
        ease_max_items: Most items (padding excluded) EASE is fitted on; above it EASE is
            skipped. It holds dense items x items float32 matrices, three at once while
            solving: 1.6 GB each at 20,000 items, and the solve grows as the cube.
        ease_l2_grid: EASE's l2 candidates, each > 0; the one with the best validation
            NDCG@10 of a train-only fit is kept (ties: the earlier value).
        latency_batch_size: Users per batched top-K query when timing a SavedModel.
        latency_repeats: Timed batches (after warm-up) per model.
    """

    ks: tuple[int, ...] = (10, 20)
    batch_size: int = 512
    pairs_per_chunk: int = 4_000_000
    als_rank: int = 64
    als_reg: float = 0.1
    als_alpha: float = 0.5
    als_iterations: int = 15
    ease_max_items: int = 20_000
    ease_l2_grid: tuple[float, ...] = (50.0, 100.0, 200.0, 500.0, 1000.0)
    latency_batch_size: int = 256
    latency_repeats: int = 30

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        _check(all(k >= 1 for k in self.ks), f"evaluate.ks must be >= 1, got {list(self.ks)}")
        _check(self.pairs_per_chunk >= 1, f"evaluate.pairs_per_chunk must be >= 1, got {self.pairs_per_chunk!r}")
        _check(self.ease_max_items >= 1, f"evaluate.ease_max_items must be >= 1, got {self.ease_max_items!r}")
        grid = tuple(self.ease_l2_grid)
        _check(len(grid) >= 1, "evaluate.ease_l2_grid must hold at least one value, got []")
        _check(all(is_number(l2) and math.isfinite(l2) and l2 > 0 for l2 in grid),
               f"evaluate.ease_l2_grid values must be finite numbers > 0, got {list(grid)}")
        object.__setattr__(self, "ease_l2_grid", tuple(float(l2) for l2 in grid))


def is_quality_metric(name: object) -> bool:
    """Whether ``name`` is ``recall@K``, ``ndcg@K``, ``hitrate@K`` (K >= 1) or ``mrr``."""
    return isinstance(name, str) and _QUALITY_METRIC.fullmatch(name) is not None


def computed_quality_metrics(cfg: EvalConfig) -> tuple[str, ...]:
    """The quality metrics an evaluation with ``cfg`` computes (see :func:`pipeline.evaluation.evaluate_scorer`)."""
    return (*(f"recall@{k}" for k in cfg.ks), *(f"ndcg@{k}" for k in cfg.ks), f"hitrate@{HITRATE_K}", "mrr")


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Validation gate between a distilled student and the model registry.

    A change is ``(student - reference) / reference`` when ``mode="relative"`` and
    ``student - reference`` when ``"absolute"``; a check passes when the change is at
    least the (signed) minimum: ``-0.05`` lets the student be up to 5% below. How far a run
    may move these settings is bounded by the operator (:class:`pipeline.config.GateBounds`),
    not by this class.

    Attributes:
        metrics: Gated test metrics.
        mode: ``"relative"`` or ``"absolute"`` for both references.
        min_change_vs_teacher: Signed minimum change against the teacher.
        min_change_vs_champion: Signed minimum change against the serving champion
            (skipped, with a warning, when there is no champion yet).
        floors: Optional absolute minimum per metric, e.g. ``{"ndcg@10": 0.05}``.
    """

    metrics: tuple[str, ...] = ("ndcg@10", "recall@20")
    mode: str = "relative"
    min_change_vs_teacher: float = -0.05
    min_change_vs_champion: float = -0.02
    floors: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "floors", dict(self.floors))
        _check(len(self.metrics) >= 1, "gate.metrics must name at least one metric, got []")
        _check(self.mode in ("relative", "absolute"), f"gate.mode must be 'relative' or 'absolute', got {self.mode!r}")
        unknown = sorted(set(self.floors) - set(self.metrics))
        _check(not unknown, f"gate.floors names metrics that are not gated: {unknown}")
        for metric, floor in self.floors.items():
            # A quality metric lies in [0, 1]; NaN fails the comparison and so is rejected.
            _check(is_quality_metric(metric), f"gate.floors names {metric!r}, not a quality metric (recall@K, ndcg@K, hitrate@K or mrr)")
            _check(is_number(floor) and 0.0 <= floor <= 1.0, f"gate.floors.{metric} must be a number in [0, 1], got {shown(floor)}")
