"""The validation gate: may this student replace the serving model?

A pure function of metrics and thresholds. It fails closed (a missing, NaN or infinite
metric rejects) and collects every failed check with its numbers, not just the first.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from pipeline.config import GateConfig

BLESSED = "BLESSED"
NOT_BLESSED = "NOT_BLESSED"


@dataclasses.dataclass(frozen=True)
class GateCheck:
    """One comparison: ``value`` against ``reference`` (or a floor) with its threshold."""

    name: str
    metric: str
    value: float | None
    reference: float | None
    change: float | None
    threshold: float
    passed: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class GateResult:
    """The gate's decision, every check, and the warnings (e.g. no champion yet)."""

    blessed: bool
    checks: tuple[GateCheck, ...]
    warnings: tuple[str, ...] = ()

    @property
    def decision(self) -> str:
        return BLESSED if self.blessed else NOT_BLESSED

    @property
    def reasons(self) -> list[str]:
        """Why it was rejected: one line per failed check (empty when blessed)."""
        return [c.reason for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"decision": self.decision, "blessed": self.blessed, "reasons": self.reasons,
                "warnings": list(self.warnings), "checks": [dataclasses.asdict(c) for c in self.checks]}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _compare(name: str, metric: str, student, reference, threshold: float, mode: str) -> GateCheck:
    if not _finite(student) or not _finite(reference):
        bad = "student" if not _finite(student) else name.split("_vs_")[-1]
        value = student if not _finite(student) else reference
        return GateCheck(name, metric, None if not _finite(student) else student, None if not _finite(reference) else reference,
                         None, threshold, False, f"{metric}: {bad} value is missing or not finite ({value!r}); the gate fails closed")
    if mode == "relative":
        if reference == 0:
            change = 0.0 if student == 0 else math.inf
        else:
            change = (student - reference) / abs(reference)
        shown = f"{change:+.2%}"
        limit = f"{threshold:+.2%}"
    else:
        change = student - reference
        shown, limit = f"{change:+.4f}", f"{threshold:+.4f}"
    passed = change >= threshold
    reason = (f"{metric}: student {student:.4f} vs {name.split('_vs_')[-1]} {reference:.4f}: change {shown} "
              f"{'>=' if passed else '<'} allowed {limit} ({mode})")
    return GateCheck(name, metric, float(student), float(reference), float(change), threshold, passed, reason)


def evaluate_gate(student: Mapping[str, float], teacher: Mapping[str, float], champion: Mapping[str, float] | None,
                  thresholds: GateConfig) -> GateResult:
    """Decide whether ``student`` may be promoted.

    Args:
        student: The candidate's test metrics.
        teacher: The teacher's test metrics on the same split.
        champion: The serving champion's metrics on the same split, or None on a first run.
        thresholds: Gated metrics, signed change thresholds and floors.

    Returns:
        A :class:`GateResult`; blessed only if every check passed.
    """
    checks, warnings = [], []
    if champion is None:
        warnings.append("no champion yet: champion checks skipped (first run)")
    for metric in thresholds.metrics:
        value = student.get(metric)
        checks.append(_compare("student_vs_teacher", metric, value, teacher.get(metric), thresholds.min_change_vs_teacher, thresholds.mode))
        if champion is not None:
            checks.append(_compare("student_vs_champion", metric, value, champion.get(metric), thresholds.min_change_vs_champion, thresholds.mode))
        if metric in thresholds.floors:
            floor = thresholds.floors[metric]
            ok = _finite(value) and value >= floor
            reason = (f"{metric}: student {value:.4f} {'>=' if ok else '<'} floor {floor:.4f}" if _finite(value)
                      else f"{metric}: student value is missing or not finite ({value!r}); the gate fails closed")
            checks.append(GateCheck("floor", metric, value if _finite(value) else None, floor, None, floor, ok, reason))
    return GateResult(all(c.passed for c in checks), tuple(checks), tuple(warnings))
