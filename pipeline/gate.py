"""The validation gate: may this student replace the serving model?

A pure function of metrics and thresholds. It fails closed: a missing, NaN, infinite or
out-of-range metric rejects, so does a reference (teacher or champion) that is zero or
negative, a gated name that is not a quality metric, and a missing champion when the
registry says there should be one. It collects every failed check with its numbers, not
just the first.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from pipeline.config import GateConfig, is_quality_metric

BLESSED = "BLESSED"
NOT_BLESSED = "NOT_BLESSED"


@dataclasses.dataclass(frozen=True)
class GateCheck:
    """One check: ``value`` against ``reference`` (or a floor) with its threshold.

    ``name`` is ``student_vs_teacher``, ``student_vs_champion``, ``floor``, or, for checks
    that compare nothing because an input is unusable, ``quality_metric`` (the gated name
    is not a quality metric), ``champion_present`` and ``metrics_present``.
    """

    name: str
    metric: str
    value: float | None
    reference: float | None
    change: float | None
    threshold: float | None
    passed: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class GateResult:
    """The gate's decision, every check, the warnings (e.g. no champion yet), and the
    champion version the student was compared with (None: none), which promotion requires
    to still be the champion."""

    blessed: bool
    checks: tuple[GateCheck, ...]
    warnings: tuple[str, ...] = ()
    champion_version: int | None = None

    @property
    def decision(self) -> str:
        return BLESSED if self.blessed else NOT_BLESSED

    @property
    def reasons(self) -> list[str]:
        """Why it was rejected: one line per failed check (empty when blessed)."""
        return [c.reason for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"decision": self.decision, "blessed": self.blessed, "reasons": self.reasons,
                "warnings": list(self.warnings), "checks": [dataclasses.asdict(c) for c in self.checks],
                "champion_version": self.champion_version}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _unusable(value, reference: bool) -> str | None:
    """Why ``value`` cannot be compared, or None. Quality metrics lie in [0, 1]; a reference
    must be positive, since a change against zero says nothing (0 vs 0 would pass as 0%)."""
    if not _finite(value):
        return f"is missing or not finite ({value!r})"
    if reference and value <= 0:
        return f"{value!r} is not positive, so there is nothing to compare against"
    if not 0 <= value <= 1:
        return f"{value!r} is outside [0, 1]"
    return None


def _metrics(values) -> Mapping:
    # Anything that is not a mapping of metrics reads as "every metric missing", which rejects.
    return values if isinstance(values, Mapping) else {}


def _compare(name: str, metric: str, student, reference, threshold: float, mode: str) -> GateCheck:
    who = name.split("_vs_")[-1]
    problems = [f"{side} value {why}" for side, why in (("student", _unusable(student, False)), (who, _unusable(reference, True))) if why]
    if problems:
        return GateCheck(name, metric, float(student) if _finite(student) else None, float(reference) if _finite(reference) else None,
                         None, threshold, False, f"{metric}: {'; '.join(problems)}; the gate fails closed")
    if mode == "relative":
        change = (student - reference) / reference
        shown = f"{change:+.2%}"
        limit = f"{threshold:+.2%}"
    else:
        change = student - reference
        shown, limit = f"{change:+.4f}", f"{threshold:+.4f}"
    passed = change >= threshold
    reason = (f"{metric}: student {student:.4f} vs {who} {reference:.4f}: change {shown} "
              f"{'>=' if passed else '<'} allowed {limit} ({mode})")
    return GateCheck(name, metric, float(student), float(reference), float(change), threshold, passed, reason)


def _floor(metric: str, value, floor: float) -> GateCheck:
    problem = _unusable(value, False)
    ok = problem is None and value >= floor
    reason = (f"{metric}: student value {problem}; the gate fails closed" if problem
              else f"{metric}: student {value:.4f} {'>=' if ok else '<'} floor {floor:.4f}")
    return GateCheck("floor", metric, float(value) if _finite(value) else None, floor, None, floor, ok, reason)


def evaluate_gate(student: Mapping[str, float], teacher: Mapping[str, float], champion: Mapping[str, float] | None,
                  thresholds: GateConfig, *, champion_expected: bool, champion_version: int | None = None) -> GateResult:
    """Decide whether ``student`` may be promoted.

    Args:
        student: The candidate's test metrics.
        teacher: The teacher's test metrics on the same split.
        champion: The serving champion's metrics on the same split, or None when there are none.
        thresholds: Gated metrics, signed change thresholds and floors.
        champion_expected: Whether the registry holds a version or a champion record, so
            the student must be compared with a champion. Only a first run (an empty
            registry) passes False; then a None ``champion`` skips the champion checks
            with a warning, otherwise it rejects.
        champion_version: The registry version ``champion`` holds the metrics of (None when
            there is no champion); recorded so promotion can check it is still the champion.

    Returns:
        A :class:`GateResult`; blessed only if there was at least one check and every
        check passed.
    """
    student, teacher = _metrics(student), _metrics(teacher)
    checks, warnings = [], []
    if champion is None and champion_expected:
        checks.append(GateCheck("champion_present", "", None, None, None, None, False,
                                "no champion metrics, but the registry is not empty (it has published versions or a champion record): the champion "
                                "record is missing, unreadable or names an unpublished version, or the champion was not evaluated; "
                                "the gate fails closed"))
    elif champion is None:
        warnings.append("no champion yet: champion checks skipped (first run)")
    else:
        champion = _metrics(champion)
    if not thresholds.metrics:
        checks.append(GateCheck("metrics_present", "", None, None, None, None, False, "no gated metrics; the gate fails closed"))
    for metric in thresholds.metrics:
        if not is_quality_metric(metric):
            checks.append(GateCheck("quality_metric", str(metric), None, None, None, None, False,
                                    f"{metric!r} is not a quality metric (recall@K, ndcg@K, hitrate@K or mrr); the gate fails closed"))
            continue
        value = student.get(metric)
        checks.append(_compare("student_vs_teacher", metric, value, teacher.get(metric), thresholds.min_change_vs_teacher, thresholds.mode))
        if champion is not None:
            checks.append(_compare("student_vs_champion", metric, value, champion.get(metric), thresholds.min_change_vs_champion, thresholds.mode))
        if metric in thresholds.floors:
            checks.append(_floor(metric, value, thresholds.floors[metric]))
    return GateResult(bool(checks) and all(c.passed for c in checks), tuple(checks), tuple(warnings),
                      champion_version if champion is not None else None)


@dataclasses.dataclass(frozen=True)
class RungResult:
    """One rung of the student ladder: its model name, budget, gate result and serving cost."""

    name: str
    share: float | None
    gate: GateResult
    users_per_s: float | None
    trainable_params: int | None


# Rungs serving within this share of the fastest passing rung's users/s count as equally cheap,
# and the one with fewer parameters wins: repeated measurements differ by a few per cent.
SPEED_TIE = 0.05


def serving_rank(rung: RungResult) -> tuple:
    """Cheapest to serve first: most users/s measured at this catalogue's size (unmeasured
    last), then fewest parameters."""
    speed = rung.users_per_s if _finite(rung.users_per_s) and rung.users_per_s > 0 else 0.0
    params = rung.trainable_params if rung.trainable_params is not None else math.inf
    return (-speed, params)


def choose_rung(rungs: list[RungResult]) -> tuple[RungResult, str]:
    """The rung to promote, and one sentence saying why.

    The cheapest rung that passes the gate (:func:`serving_rank`; rungs within
    :data:`SPEED_TIE` of the fastest passing one are equally cheap, and fewer parameters win).
    When none passes, the largest rung (the one closest to the teacher) stands for the rejection.

    Raises:
        ValueError: For an empty ladder.
    """
    if not rungs:
        raise ValueError("the student ladder is empty")
    passing = sorted((r for r in rungs if r.gate.blessed), key=serving_rank)
    if passing:
        fastest = -serving_rank(passing[0])[0]
        tied = [r for r in passing if -serving_rank(r)[0] >= fastest * (1 - SPEED_TIE)]
        chosen = min(tied, key=lambda r: (serving_rank(r)[1], serving_rank(r)[0]))
        cheaper = [r.name for r in sorted(rungs, key=serving_rank) if not r.gate.blessed and serving_rank(r) < serving_rank(chosen)]
        faster = [r.name for r in tied if serving_rank(r) < serving_rank(chosen)]  # within the tie, more parameters
        speed = (f"{chosen.users_per_s:,.0f} users/s" if chosen.users_per_s
                 else f"{chosen.trainable_params:,} parameters" if chosen.trainable_params is not None else "cost not measured")
        why = (f"{chosen.name} is the cheapest rung to serve that passes the gate ({speed})"
               + (f"; {', '.join(faster)} serve(s) within {SPEED_TIE:.0%} of it with more parameters" if faster else "")
               + (f"; cheaper {', '.join(cheaper)} failed it" if cheaper else "")
               + f"; {len(passing)} of {len(rungs)} rung(s) passed")
        return chosen, why
    largest = max(rungs, key=lambda r: (r.share or 0.0, r.trainable_params or 0))
    return largest, f"no rung passes the gate; {largest.name}, the largest, stands for the rejection"
