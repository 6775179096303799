"""The operator's bounds on the gate: how far a run's settings may loosen it.

A run's gate settings arrive from the trigger form (``min_change_vs_teacher``,
``config_overrides``), so whoever can trigger a run could otherwise open the gate. The
bounds come from elsewhere: built-in defaults here, then the JSON object in
``$RECSYS_GATE_BOUNDS``, then the same JSON in the Airflow Variable ``recsys_gate_bounds``
(the DAG reads it and passes it on; this package never imports Airflow). A run whose
settings go beyond them fails when its config is resolved; nothing is clamped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from pipeline.config.checks import ConfigError, _check, apply_settings
from pipeline.config.evaluation import QUALITY_METRIC_FAMILIES, computed_quality_metrics, is_quality_metric
from pipeline.config.sections import PipelineConfig

GATE_BOUNDS_ENV = "RECSYS_GATE_BOUNDS"
GATE_BOUNDS_VARIABLE = "recsys_gate_bounds"
GATE_MODES = ("relative", "absolute")


@dataclasses.dataclass(frozen=True)
class GateBounds:
    """Limits on a run's ``gate`` settings, set by the operator and never by a trigger.

    Attributes:
        min_change_vs_teacher: Lowest ``gate.min_change_vs_teacher`` a run may use
            (``-0.10``: the student may be at most 10% below the teacher).
        min_change_vs_champion: Lowest ``gate.min_change_vs_champion``.
        metric_families: Families (the name before ``@``) a run may gate; a subset of
            ``recall``, ``ndcg``, ``hitrate``, ``mrr``.
        required_metrics: Metrics every run must gate; a run may add others, never drop these.
        modes: Allowed ``gate.mode`` values. The threshold bounds are read in the run's mode,
            so allowing ``"absolute"`` makes ``-0.10`` mean 0.10 of NDCG, not 10%.
    """

    min_change_vs_teacher: float = -0.10
    min_change_vs_champion: float = -0.05
    metric_families: tuple[str, ...] = QUALITY_METRIC_FAMILIES
    required_metrics: tuple[str, ...] = ("ndcg@10", "recall@20")
    modes: tuple[str, ...] = ("relative",)

    def __post_init__(self) -> None:
        for name in ("metric_families", "required_metrics", "modes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("min_change_vs_teacher", "min_change_vs_champion"):
            _check(math.isfinite(getattr(self, name)), f"gate bounds: {name} must be a finite number, got {getattr(self, name)!r}")
        unknown = [f for f in self.metric_families if f not in QUALITY_METRIC_FAMILIES]
        _check(bool(self.metric_families) and not unknown,
               f"gate bounds: metric_families must be a non-empty subset of {list(QUALITY_METRIC_FAMILIES)}, got {list(self.metric_families)}")
        bad = [m for m in self.required_metrics if not is_quality_metric(m) or _family(m) not in self.metric_families]
        _check(not bad, f"gate bounds: required_metrics {bad} are not quality metrics of the families {list(self.metric_families)}")
        _check(bool(self.modes) and set(self.modes) <= set(GATE_MODES),
               f"gate bounds: modes must be a non-empty subset of {list(GATE_MODES)}, got {list(self.modes)}")


def _family(metric: str) -> str:
    return metric.partition("@")[0]


def load_gate_bounds(variable: str | Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> GateBounds:
    """The operator's bounds: built-in defaults, then ``$RECSYS_GATE_BOUNDS``, then ``variable``.

    Each source is a JSON object of :class:`GateBounds` fields, e.g.
    ``{"min_change_vs_teacher": -0.2, "required_metrics": ["ndcg@10"]}``; keys it does not
    name keep the value before it.

    Args:
        variable: The Airflow Variable ``recsys_gate_bounds`` (its JSON text or a mapping), if set.
        environ: Where to read ``RECSYS_GATE_BOUNDS``; ``os.environ`` when None.

    Returns:
        The bounds.

    Raises:
        ConfigError: When a source is not a JSON object, names an unknown field, or holds a
            value of the wrong type or out of range.
    """
    environ = os.environ if environ is None else environ
    bounds = GateBounds()
    for label, source in ((f"${GATE_BOUNDS_ENV}", environ.get(GATE_BOUNDS_ENV)), (f"Variable {GATE_BOUNDS_VARIABLE}", variable)):
        if source is None or (isinstance(source, str) and not source.strip()):
            continue
        if isinstance(source, str):
            try:
                source = json.loads(source)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{label} must be a JSON object: {err}") from None
        bounds = apply_settings(bounds, source, label)
    return bounds


def check_gate_bounds(cfg: PipelineConfig, bounds: GateBounds) -> None:
    """Reject a config whose gate goes beyond the operator's bounds; every violation is named.

    Args:
        cfg: The run's resolved config (``gate``, and ``evaluate`` for the metrics it computes).
        bounds: The operator's bounds (:func:`load_gate_bounds`).

    Raises:
        ConfigError: Naming each setting, its value and the bound it breaks.
    """
    gate, problems = cfg.gate, []
    for name in ("min_change_vs_teacher", "min_change_vs_champion"):
        value, bound = getattr(gate, name), getattr(bounds, name)
        # NaN compares false with everything, so `not value >= bound` also rejects it.
        if not value >= bound:
            problems.append(f"gate.{name}={value!r} is below the operator's bound {name}={bound!r}")
    if gate.mode not in bounds.modes:
        problems.append(f"gate.mode={gate.mode!r} is not in the operator's bound modes={list(bounds.modes)}")
    computed = computed_quality_metrics(cfg.evaluate)
    for metric in gate.metrics:
        if not is_quality_metric(metric):
            problems.append(f"gate.metrics includes {metric!r}, not a quality metric (recall@K, ndcg@K, hitrate@K or mrr)")
        elif _family(metric) not in bounds.metric_families:
            problems.append(f"gate.metrics includes {metric!r}, outside the operator's bound metric_families={list(bounds.metric_families)}")
        elif metric not in computed:
            problems.append(f"gate.metrics includes {metric!r}, which the evaluation does not compute (it computes {list(computed)})")
    missing = [m for m in bounds.required_metrics if m not in gate.metrics]
    if missing:
        problems.append(f"gate.metrics={list(gate.metrics)} lacks {missing} of the operator's bound required_metrics={list(bounds.required_metrics)}")
    if problems:
        raise ConfigError(f"the run's gate settings are outside the operator's bounds (${GATE_BOUNDS_ENV}, Airflow Variable "
                          f"{GATE_BOUNDS_VARIABLE}): " + "; ".join(problems))
