"""Settings of the evaluation harness and of the validation gate."""

from __future__ import annotations

import dataclasses
from typing import Mapping

from pipeline.config.checks import _check


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation harness and baselines.

    Attributes:
        ks: Cut-offs of Recall and NDCG.
        batch_size: Users scored per batch.
        als_rank: Spark MLlib ALS factors.
        als_reg: ALS regularisation.
        als_alpha: ALS implicit-feedback confidence scale.
        als_iterations: ALS sweeps.
        latency_batch_size: Users per batched top-K query when timing a SavedModel.
        latency_repeats: Timed batches (after warm-up) per model.
    """

    ks: tuple[int, ...] = (10, 20)
    batch_size: int = 512
    als_rank: int = 64
    als_reg: float = 0.1
    als_alpha: float = 0.5
    als_iterations: int = 15
    latency_batch_size: int = 256
    latency_repeats: int = 30

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        _check(all(k >= 1 for k in self.ks), "evaluate.ks must be >= 1")


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Validation gate between a distilled student and the model registry.

    A change is ``(student - reference) / reference`` when ``mode="relative"`` and
    ``student - reference`` when ``"absolute"``; a check passes when the change is at
    least the (signed) minimum: ``-0.05`` lets the student be up to 5% below.

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
        _check(len(self.metrics) >= 1, "gate.metrics must name at least one metric")
        _check(self.mode in ("relative", "absolute"), f"gate.mode must be 'relative' or 'absolute', got {self.mode!r}")
        unknown = sorted(set(self.floors) - set(self.metrics))
        _check(not unknown, f"gate.floors names metrics that are not gated: {unknown}")
