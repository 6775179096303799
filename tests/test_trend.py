"""The report's trend across nights, from the registry's run records."""

from __future__ import annotations

from pipeline.report import write_report
from pipeline.steps.run import task_seconds
from pipeline.trend import TREND_PNG, nights, trend_rows


def record(ds: str, decision: str, student: float, teacher: float = 0.2, champion: float | None = 0.19, **extra) -> dict:
    return {"ds": ds, "decision": decision, "run_key": f"{ds}_k", "metrics": {"ndcg@10": student, "throughput_users_per_s": 1234.4},
            "teacher_metrics": {"ndcg@10": teacher}, "champion_metrics": None if champion is None else {"ndcg@10": champion},
            "student_model": "student_kd@5%", "seconds": {"teacher": 100.4, "student": 50.6}, **extra}


def test_each_night_shows_its_newest_attempt_and_only_the_last_nights():
    records = [record("2024-01-02", "BLESSED", 0.18), record("2024-01-01", "NOT_BLESSED", 0.10),
               record("2024-01-02", "NOT_BLESSED", 0.12), {"ds": "2024-01-03", "run_key": "hand-made"}]
    assert [(r["ds"], r["metrics"]["ndcg@10"]) for r in nights(records)] == [("2024-01-01", 0.10), ("2024-01-02", 0.12)]
    many = [record(f"2024-01-{day:02d}", "BLESSED", 0.2) for day in range(1, 21)]
    assert [r["ds"] for r in nights(many, n=3)] == ["2024-01-18", "2024-01-19", "2024-01-20"]


def test_a_row_gives_the_decision_the_rung_the_three_ndcgs_the_cost_and_the_seconds():
    rows = trend_rows([record("2024-01-01", "BLESSED", 0.18, champion=None),
                       record("2024-01-02", "BLESSED", 0.185, promoted=False)])
    assert rows == [
        ["2024-01-01", "BLESSED", "student_kd@5%", "–", "0.2000", "0.1800", "1,234", "100", "–", "51", "–"],
        ["2024-01-02", "BLESSED (not promoted)", "student_kd@5%", "0.1900", "0.2000", "0.1850", "1,234", "100", "–", "51", "–"],
    ]


def test_the_time_columns_give_each_task_and_every_rung_together():
    seconds = {"teacher": 0.0, "student": 50.6, "soft_targets": 12.3,
               "students": {"student_kd@5%": 50.6, "student_kd@10%": 70.2}, "evaluate": 30.4}
    [row] = trend_rows([record("2024-01-01", "BLESSED", 0.18, seconds=seconds)])
    assert row[-4:] == ["0", "12", "121", "30"]  # a reused teacher took no training; the rungs add up


def test_a_run_records_the_seconds_of_each_task():
    teacher = {"seconds": 100.0, "reused": False}
    students = [{"name": "student_kd@5%", "seconds": 40.0, "soft_targets_seconds": 9.5},
                {"name": "student_kd@10%", "seconds": 60.0, "soft_targets_seconds": 9.5}]
    assert task_seconds(teacher, students, {"seconds": 20.0}) == {
        "teacher": 100.0, "soft_targets": 9.5, "students": {"student_kd@5%": 40.0, "student_kd@10%": 60.0}, "evaluate": 20.0}
    assert task_seconds({**teacher, "reused": True}, students[:1], {})["teacher"] == 0.0
    assert task_seconds(teacher, [{"name": "student_kd", "seconds": 1.0}], {}) == {
        "teacher": 100.0, "soft_targets": None, "students": {"student_kd": 1.0}, "evaluate": None}


def write(tmp_path, trend):
    gate = {"decision": "BLESSED", "blessed": True, "reasons": [], "warnings": [], "checks": []}
    evaluation = {"split": "test", "users": 3, "models": {"teacher": {"ndcg@10": 0.2}}}
    out = write_report(tmp_path / "report", {"ds": "2024-01-02"}, evaluation, gate, {}, None, trend=trend)
    return (tmp_path / "report" / "report.html").read_text(), (tmp_path / "report" / "report.md").read_text(), out


def test_the_report_shows_the_trend_after_two_nights(tmp_path):
    html, markdown, _ = write(tmp_path, [record("2024-01-01", "NOT_BLESSED", 0.1), record("2024-01-02", "BLESSED", 0.18)])
    assert "The last nights" in html and "2024-01-01" in html and "NOT_BLESSED" in html and TREND_PNG in html
    assert "| 2024-01-02 | BLESSED | student_kd@5% | 0.1900 | 0.2000 | 0.1800 |" in markdown
    assert (tmp_path / "report" / TREND_PNG).stat().st_size > 0


def test_the_first_night_says_so(tmp_path):
    html, markdown, _ = write(tmp_path, [record("2024-01-02", "BLESSED", 0.18)])
    assert "The first night of this DAG in this registry: no trend yet." in html
    assert "no trend yet" in markdown and not (tmp_path / "report" / TREND_PNG).exists()
