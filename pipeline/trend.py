"""The trend across nights: the last runs of this DAG, from the registry's run journal.

Every run attempt is recorded in the registry (``runs.jsonl``) with its date, decision, the
chosen student's, the teacher's and the champion's metrics and serving cost, and the seconds of
the teacher's training, the soft targets, every rung's distillation and the evaluation. A run report shows the last :data:`TREND_NIGHTS` dates (the newest attempt of
each) as a table and a plot, so a drifting data set, a slowly degrading champion or a gate
that rejects night after night shows at a glance.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

TREND_NIGHTS = 14
TREND_PNG = "trend.png"
TREND_HEADERS = ["ds", "decision", "rung", "champion NDCG@10", "teacher NDCG@10", "student NDCG@10", "student users/s",
                 "teacher s", "soft targets s", "students s", "evaluation s"]


def nights(records: Sequence[Mapping], n: int = TREND_NIGHTS) -> list[Mapping]:
    """The newest attempt of each of the last ``n`` dates, oldest date first (records without a
    date or a decision, such as a registry's hand-made entries, are left out)."""
    latest: dict[str, Mapping] = {}
    for record in records:  # the journal is in time order: a later attempt of a date wins
        if record.get("ds") and record.get("decision"):
            latest[str(record["ds"])] = record
    return [latest[ds] for ds in sorted(latest)[-n:]]


def _ndcg(metrics) -> float | None:
    value = metrics.get("ndcg@10") if isinstance(metrics, Mapping) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _cell(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _students_seconds(seconds: Mapping) -> float | None:
    """Every rung's training seconds added up (a record from before the ladder: its one student's)."""
    rungs = seconds.get("students")
    if isinstance(rungs, Mapping):
        values = [v for v in rungs.values() if isinstance(v, (int, float))]
        return float(sum(values)) if values else None
    return seconds.get("student")


def trend_rows(records: Sequence[Mapping]) -> list[list[str]]:
    """One row of :data:`TREND_HEADERS` per night of :func:`nights`: the time columns are the
    wall seconds of the teacher's training (0: reused), the soft targets, every rung's
    distillation together and the evaluation ("–" where a record does not say)."""
    rows = []
    for record in nights(records):
        student, seconds = record.get("metrics") or {}, record.get("seconds") or {}
        promoted = "" if record.get("promoted", True) or record.get("decision") != "BLESSED" else " (not promoted)"
        rows.append([str(record["ds"]), f"{record['decision']}{promoted}", str(record.get("student_model") or "–"),
                     _cell(_ndcg(record.get("champion_metrics")), ".4f"), _cell(_ndcg(record.get("teacher_metrics")), ".4f"),
                     _cell(_ndcg(student), ".4f"), _cell(student.get("throughput_users_per_s"), ",.0f"),
                     _cell(seconds.get("teacher"), ".0f"), _cell(seconds.get("soft_targets"), ".0f"),
                     _cell(_students_seconds(seconds), ".0f"), _cell(seconds.get("evaluate"), ".0f")])
    return rows


def plot_trend(path: Path, records: Sequence[Mapping]) -> None:
    """NDCG@10 of champion, teacher and student by night; rejected nights marked with an x."""
    from matplotlib.figure import Figure

    shown = nights(records)
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.subplots()
    x = list(range(len(shown)))
    for key, label, style in (("champion_metrics", "champion", "s-"), ("teacher_metrics", "teacher", "o-"),
                              ("metrics", "promoted or rejected student", "^-")):
        values = [_ndcg(r.get(key)) for r in shown]
        ax.plot(x, [math.nan if v is None else v for v in values], style, label=label)
    rejected = [(i, _ndcg(r.get("metrics"))) for i, r in enumerate(shown) if r.get("decision") != "BLESSED"]
    if rejected:
        ax.scatter([i for i, _ in rejected], [math.nan if v is None else v for _, v in rejected], marker="x", s=90,
                   color="red", zorder=4, label="NOT_BLESSED")
    ax.set_xticks(x, [str(r["ds"]) for r in shown], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("NDCG@10 (test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"the last {len(shown)} night(s)")
    fig.savefig(path, dpi=100)
