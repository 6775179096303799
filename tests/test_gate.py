"""The gate on hand-made cases."""

import math

import pytest

from pipeline.config import GateConfig
from pipeline.gate import BLESSED, NOT_BLESSED, evaluate_gate

TEACHER = {"ndcg@10": 0.200, "recall@20": 0.300}
GATE = GateConfig(metrics=("ndcg@10", "recall@20"), mode="relative", min_change_vs_teacher=-0.03, min_change_vs_champion=-0.01)


def test_passes_within_threshold_of_teacher_and_champion():
    # ndcg: 0.196 / 0.200 - 1 = -2.0% >= -3%; recall: 0.294 / 0.300 - 1 = -2.0% >= -3%.
    # champion 0.195 / 0.290: changes +0.51% and +1.38% >= -1%.
    result = evaluate_gate({"ndcg@10": 0.196, "recall@20": 0.294}, TEACHER, {"ndcg@10": 0.195, "recall@20": 0.290}, GATE)
    assert result.blessed and result.decision == BLESSED and result.reasons == [] and len(result.checks) == 4
    assert result.checks[0].change == pytest.approx(-0.02)


def test_fails_against_teacher_and_collects_every_failure():
    # ndcg: 0.190 / 0.200 - 1 = -5% < -3%; recall: 0.285 / 0.300 - 1 = -5% < -3%.
    result = evaluate_gate({"ndcg@10": 0.190, "recall@20": 0.285}, TEACHER, None, GATE)
    assert result.decision == NOT_BLESSED
    assert len(result.reasons) == 2
    assert "ndcg@10: student 0.1900 vs teacher 0.2000: change -5.00% < allowed -3.00% (relative)" in result.reasons[0]
    assert "recall@20" in result.reasons[1]


def test_fails_against_champion_only():
    # Teacher checks pass (-1%), but the champion is better: 0.198 / 0.210 - 1 = -5.7% < -1%.
    result = evaluate_gate({"ndcg@10": 0.198, "recall@20": 0.297}, TEACHER, {"ndcg@10": 0.210, "recall@20": 0.297}, GATE)
    assert not result.blessed
    assert [c.name for c in result.checks if not c.passed] == ["student_vs_champion"]
    assert "vs champion 0.2100" in result.reasons[0]


def test_first_run_skips_champion_with_a_warning():
    result = evaluate_gate({"ndcg@10": 0.2, "recall@20": 0.3}, TEACHER, None, GATE)
    assert result.blessed
    assert [c.name for c in result.checks] == ["student_vs_teacher", "student_vs_teacher"]
    assert result.warnings == ("no champion yet: champion checks skipped (first run)",)


@pytest.mark.parametrize("bad", [math.nan, math.inf, None, "0.2"])
def test_missing_or_non_finite_metric_fails_closed(bad):
    student = {"ndcg@10": bad, "recall@20": 0.5}
    result = evaluate_gate({k: v for k, v in student.items() if v is not None}, TEACHER, None, GATE)
    assert not result.blessed
    assert any("missing or not finite" in r and r.startswith("ndcg@10") for r in result.reasons)


def test_nan_teacher_metric_fails_closed():
    result = evaluate_gate({"ndcg@10": 0.3, "recall@20": 0.4}, {"ndcg@10": math.nan, "recall@20": 0.3}, None, GATE)
    assert not result.blessed and "teacher value is missing or not finite" in result.reasons[0]


def test_absolute_mode_floor_and_signed_threshold():
    # absolute: 0.205 - 0.200 = +0.005 < required +0.01 (the student must beat the teacher);
    # floor: recall 0.25 < 0.28.
    gate = GateConfig(metrics=("ndcg@10", "recall@20"), mode="absolute", min_change_vs_teacher=0.01, floors={"recall@20": 0.28})
    result = evaluate_gate({"ndcg@10": 0.205, "recall@20": 0.35}, TEACHER, None, gate)
    assert [c.metric for c in result.checks if not c.passed] == ["ndcg@10"]
    result = evaluate_gate({"ndcg@10": 0.215, "recall@20": 0.25}, TEACHER, None, gate)
    assert [(c.name, c.metric) for c in result.checks if not c.passed] == [("student_vs_teacher", "recall@20"), ("floor", "recall@20")]
