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
    result = evaluate_gate({"ndcg@10": 0.196, "recall@20": 0.294}, TEACHER, {"ndcg@10": 0.195, "recall@20": 0.290}, GATE,
                           champion_expected=True)
    assert result.blessed and result.decision == BLESSED and result.reasons == [] and len(result.checks) == 4
    assert result.checks[0].change == pytest.approx(-0.02)


def test_fails_against_teacher_and_collects_every_failure():
    # ndcg: 0.190 / 0.200 - 1 = -5% < -3%; recall: 0.285 / 0.300 - 1 = -5% < -3%.
    result = evaluate_gate({"ndcg@10": 0.190, "recall@20": 0.285}, TEACHER, None, GATE, champion_expected=False)
    assert result.decision == NOT_BLESSED
    assert len(result.reasons) == 2
    assert "ndcg@10: student 0.1900 vs teacher 0.2000: change -5.00% < allowed -3.00% (relative)" in result.reasons[0]
    assert "recall@20" in result.reasons[1]


def test_fails_against_champion_only():
    # Teacher checks pass (-1%), but the champion is better: 0.198 / 0.210 - 1 = -5.7% < -1%.
    result = evaluate_gate({"ndcg@10": 0.198, "recall@20": 0.297}, TEACHER, {"ndcg@10": 0.210, "recall@20": 0.297}, GATE,
                           champion_expected=True)
    assert not result.blessed
    assert [c.name for c in result.checks if not c.passed] == ["student_vs_champion"]
    assert "vs champion 0.2100" in result.reasons[0]


def test_first_run_skips_champion_with_a_warning():
    # An empty registry: the student equals the teacher (change 0% >= -3%) and there is no champion to beat.
    result = evaluate_gate({"ndcg@10": 0.2, "recall@20": 0.3}, TEACHER, None, GATE, champion_expected=False)
    assert result.blessed
    assert [c.name for c in result.checks] == ["student_vs_teacher", "student_vs_teacher"]
    assert result.warnings == ("no champion yet: champion checks skipped (first run)",)


@pytest.mark.parametrize("bad", [math.nan, math.inf, None, "0.2"])
def test_missing_or_non_finite_metric_fails_closed(bad):
    student = {"ndcg@10": bad, "recall@20": 0.5}
    result = evaluate_gate({k: v for k, v in student.items() if v is not None}, TEACHER, None, GATE, champion_expected=False)
    assert not result.blessed
    assert any("missing or not finite" in r and r.startswith("ndcg@10") for r in result.reasons)


def test_nan_teacher_metric_fails_closed():
    result = evaluate_gate({"ndcg@10": 0.3, "recall@20": 0.4}, {"ndcg@10": math.nan, "recall@20": 0.3}, None, GATE,
                           champion_expected=False)
    assert not result.blessed and "teacher value is missing or not finite" in result.reasons[0]


def test_absolute_mode_floor_and_signed_threshold():
    # absolute: 0.205 - 0.200 = +0.005 < required +0.01 (the student must beat the teacher);
    # floor: recall 0.25 < 0.28.
    gate = GateConfig(metrics=("ndcg@10", "recall@20"), mode="absolute", min_change_vs_teacher=0.01, floors={"recall@20": 0.28})
    result = evaluate_gate({"ndcg@10": 0.205, "recall@20": 0.35}, TEACHER, None, gate, champion_expected=False)
    assert [c.metric for c in result.checks if not c.passed] == ["ndcg@10"]
    result = evaluate_gate({"ndcg@10": 0.215, "recall@20": 0.25}, TEACHER, None, gate, champion_expected=False)
    assert [(c.name, c.metric) for c in result.checks if not c.passed] == [("student_vs_teacher", "recall@20"), ("floor", "recall@20")]


def test_zero_student_against_zero_teacher_is_rejected():
    # 0 vs 0 used to be a change of 0% >= -3% and pass; a zero reference now rejects.
    result = evaluate_gate({"ndcg@10": 0.0, "recall@20": 0.0}, {"ndcg@10": 0.0, "recall@20": 0.0}, None, GATE,
                           champion_expected=False)
    assert not result.blessed and len(result.reasons) == 2
    assert result.reasons[0] == ("ndcg@10: teacher value 0.0 is not positive, so there is nothing to compare against; "
                                 "the gate fails closed")


@pytest.mark.parametrize("side", ["teacher", "champion"])
@pytest.mark.parametrize("bad, why", [(0.0, "0.0 is not positive, so there is nothing to compare against"),
                                      (-0.2, "-0.2 is not positive, so there is nothing to compare against"),
                                      (math.nan, "is missing or not finite (nan)"), (math.inf, "is missing or not finite (inf)"),
                                      (None, "is missing or not finite (None)"), (1.5, "1.5 is outside [0, 1]")])
def test_unusable_reference_rejects(side, bad, why):
    # ndcg@10 alone is bad; everything else passes: the student equals both references (0%).
    good = {"ndcg@10": 0.2, "recall@20": 0.3}
    broken = {k: v for k, v in {**good, "ndcg@10": bad}.items() if v is not None}
    teacher, champion = (broken, good) if side == "teacher" else (good, broken)
    result = evaluate_gate(good, teacher, champion, GATE, champion_expected=True)
    assert not result.blessed
    assert result.reasons == [f"ndcg@10: {side} value {why}; the gate fails closed"]
    failed = [c for c in result.checks if not c.passed][0]
    assert (failed.name, failed.change) == (f"student_vs_{side}", None)


def test_negative_or_above_one_student_rejects():
    # A quality metric outside [0, 1] is a broken evaluation, whatever the threshold says.
    result = evaluate_gate({"ndcg@10": -0.1, "recall@20": 1.2}, TEACHER, None, GATE, champion_expected=False)
    assert result.reasons == ["ndcg@10: student value -0.1 is outside [0, 1]; the gate fails closed",
                              "recall@20: student value 1.2 is outside [0, 1]; the gate fails closed"]


@pytest.mark.parametrize("metric", ["users", "trainable_params", "latency_ms_p50", "coverage@10", "recall@0", "ndcg"])
def test_a_gated_name_that_is_not_a_quality_metric_rejects(metric):
    # The student is 100x the teacher on the bogus key and equal on ndcg@10: only the bogus key fails.
    gate = GateConfig(metrics=("ndcg@10", metric), min_change_vs_teacher=-0.03)
    result = evaluate_gate({"ndcg@10": 0.2, metric: 100.0}, {"ndcg@10": 0.2, metric: 1.0}, None, gate, champion_expected=False)
    assert not result.blessed
    assert result.reasons == [f"{metric!r} is not a quality metric (recall@K, ndcg@K, hitrate@K or mrr); the gate fails closed"]
    assert [c.name for c in result.checks] == ["student_vs_teacher", "quality_metric"]


def test_registry_with_versions_but_no_champion_metrics_rejects():
    # The same numbers bless on a first run (test_first_run_skips_champion_with_a_warning).
    result = evaluate_gate({"ndcg@10": 0.2, "recall@20": 0.3}, TEACHER, None, GATE, champion_expected=True)
    assert not result.blessed and result.warnings == ()
    assert [c.name for c in result.checks if not c.passed] == ["champion_present"]
    assert "no champion metrics, but the registry is not empty" in result.reasons[0]


def test_champion_metrics_that_are_not_a_mapping_read_as_missing():
    result = evaluate_gate({"ndcg@10": 0.2, "recall@20": 0.3}, TEACHER, "unreadable", GATE, champion_expected=True)
    assert not result.blessed
    assert result.reasons == ["ndcg@10: champion value is missing or not finite (None); the gate fails closed",
                              "recall@20: champion value is missing or not finite (None); the gate fails closed"]


def test_relative_change_is_against_a_positive_reference():
    # mrr: (0.045 - 0.050) / 0.050 = -10% < -3%; hitrate@10: (0.41 - 0.40) / 0.40 = +2.5% >= -3%.
    gate = GateConfig(metrics=("mrr", "hitrate@10"), min_change_vs_teacher=-0.03)
    result = evaluate_gate({"mrr": 0.045, "hitrate@10": 0.41}, {"mrr": 0.050, "hitrate@10": 0.40}, None, gate, champion_expected=False)
    assert [c.change for c in result.checks] == [pytest.approx(-0.10), pytest.approx(0.025)]
    assert [c.passed for c in result.checks] == [False, True]


# ----------------------------------------------------------------------------- the student ladder

TEACHER = {"ndcg@10": 0.20, "recall@20": 0.30}


def rung(name: str, share: float, ndcg: float, users_per_s: float | None, params: int):
    """A rung gated against TEACHER alone (first run): passes when within 3% of it on both metrics."""
    from pipeline.gate import RungResult

    metrics = {"ndcg@10": ndcg, "recall@20": 0.30}
    return RungResult(name, share, evaluate_gate(metrics, TEACHER, None, GATE, champion_expected=False), users_per_s, params)


def test_the_cheapest_rung_to_serve_that_passes_is_chosen():
    from pipeline.gate import choose_rung

    # 2%: fastest but 0.19 is -5% of 0.20 (fails -3%); 5%: -1.5%, passes, 30k users/s; 10%: passes, 20k users/s.
    rungs = [rung("s2", 0.02, 0.190, 50_000.0, 10), rung("s5", 0.05, 0.197, 30_000.0, 50), rung("s10", 0.10, 0.199, 20_000.0, 100)]
    chosen, why = choose_rung(rungs)
    assert chosen.name == "s5"
    assert why == "s5 is the cheapest rung to serve that passes the gate (30,000 users/s); cheaper s2 failed it; 2 of 3 rung(s) passed"


def test_without_a_throughput_the_fewest_parameters_win_and_a_measured_rung_comes_first():
    from pipeline.gate import choose_rung

    assert choose_rung([rung("a", 0.1, 0.2, None, 100), rung("b", 0.05, 0.2, None, 50)])[0].name == "b"
    assert choose_rung([rung("a", 0.1, 0.2, 1_000.0, 100), rung("b", 0.05, 0.2, None, 50)])[0].name == "a"
    assert choose_rung([rung("a", 0.1, 0.2, 1_000.0, 100), rung("b", 0.05, 0.2, 1_000.0, 50)])[0].name == "b"  # tie


def test_when_no_rung_passes_the_largest_stands_for_the_rejection():
    from pipeline.gate import choose_rung

    chosen, why = choose_rung([rung("s5", 0.05, 0.10, 30_000.0, 50), rung("s10", 0.10, 0.15, 20_000.0, 100)])
    assert chosen.name == "s10" and not chosen.gate.blessed
    assert why == "no rung passes the gate; s10, the largest, stands for the rejection"
    with pytest.raises(ValueError, match="empty"):
        choose_rung([])


def test_rungs_within_the_speed_tie_count_as_equally_cheap_and_fewer_parameters_win():
    from pipeline.gate import SPEED_TIE, choose_rung

    # 10%: 30,000 users/s; 5%: 29,000 (3.3% slower, inside the 5% tie) with half the parameters.
    assert SPEED_TIE == 0.05
    chosen, why = choose_rung([rung("s5", 0.05, 0.2, 29_000.0, 50), rung("s10", 0.10, 0.2, 30_000.0, 100)])
    assert chosen.name == "s5"
    assert why == ("s5 is the cheapest rung to serve that passes the gate (29,000 users/s); s10 serve(s) within 5% of it "
                   "with more parameters; 2 of 2 rung(s) passed")
    # 27,000 is 10% slower: outside the tie, the faster rung wins.
    assert choose_rung([rung("s5", 0.05, 0.2, 27_000.0, 50), rung("s10", 0.10, 0.2, 30_000.0, 100)])[0].name == "s10"
