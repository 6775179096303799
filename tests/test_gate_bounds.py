"""The operator's gate bounds: a trigger cannot open the gate, and a damaged registry is no first run."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest

from pipeline.config import (GATE_BOUNDS_ENV, SPARK_MASTERS_ENV, ConfigError, GateBounds, check_gate_bounds, load_config,
                             load_gate_bounds)
from pipeline.registry import Registry
from pipeline.steps.run import champion_dir, decide, resolve_run, settings

DUE = dt.datetime(2024, 2, 1, 2, 0, tzinfo=dt.timezone.utc)
BOUNDS = "the run's gate settings are outside the operator's bounds"


@pytest.fixture(autouse=True)
def operator_env(tmp_path, monkeypatch):
    """A data root of its own and no operator bounds in the environment unless a test sets them."""
    monkeypatch.setenv("RECSYS_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.delenv(GATE_BOUNDS_ENV, raising=False)


def rejection(params: dict, gate_bounds=None) -> str:
    with pytest.raises(ConfigError, match=BOUNDS) as err:
        resolve_run(params, DUE, "manual", gate_bounds=gate_bounds)
    return str(err.value)


# ---------------------------------------------------------------- the trigger form
def test_defaults_are_within_the_default_bounds_and_recorded():
    run = resolve_run({}, DUE, "scheduled")
    assert run["gate_bounds"] == {"min_change_vs_teacher": -0.10, "min_change_vs_champion": -0.05,
                                  "metric_families": ("recall", "ndcg", "hitrate", "mrr"),
                                  "required_metrics": ("ndcg@10", "recall@20"), "modes": ("relative",)}


def test_trigger_param_below_the_teacher_bound_is_rejected():
    # -5 would bless a student at 1% of the teacher: (0.002 - 0.2) / 0.2 = -99% >= -500%.
    message = rejection({"min_change_vs_teacher": -5})
    assert "gate.min_change_vs_teacher=-5.0 is below the operator's bound min_change_vs_teacher=-0.1" in message
    # Exactly at the bound is allowed.
    assert resolve_run({"min_change_vs_teacher": -0.10}, DUE, "manual")["config"]["gate"]["min_change_vs_teacher"] == -0.10


def test_trigger_param_below_the_champion_bound_is_rejected():
    message = rejection({"min_change_vs_champion": -0.06})
    assert "gate.min_change_vs_champion=-0.06 is below the operator's bound min_change_vs_champion=-0.05" in message


def test_overrides_gating_a_count_instead_of_quality_are_rejected():
    message = rejection({"config_overrides": {"gate": {"metrics": ["users"]}}})
    assert "gate.metrics includes 'users', not a quality metric (recall@K, ndcg@K, hitrate@K or mrr)" in message
    assert ("gate.metrics=['users'] lacks ['ndcg@10', 'recall@20'] of the operator's bound "
            "required_metrics=['ndcg@10', 'recall@20']") in message


def test_every_violation_is_named_in_one_error():
    gate = {"mode": "absolute", "metrics": ["ndcg@10", "recall@20", "trainable_params"]}
    message = rejection({"min_change_vs_teacher": -1, "config_overrides": {"gate": gate}})
    assert "gate.min_change_vs_teacher=-1.0 is below" in message
    # Absolute mode would read the relative bound -0.10 as 0.10 of NDCG (half of an NDCG of 0.2).
    assert "gate.mode='absolute' is not in the operator's bound modes=['relative']" in message
    assert "'trainable_params', not a quality metric" in message


@pytest.mark.parametrize("overrides, message", [
    ({"gate": {"metrics": ["mrr"]}}, "lacks ['ndcg@10', 'recall@20'] of the operator's bound required_metrics"),
    ({"gate": {"metrics": ["ndcg@10", "recall@20", "recall@50"]}}, "'recall@50', which the evaluation does not compute"),
    ({"evaluate": {"ks": [10]}}, "'recall@20', which the evaluation does not compute"),
    ({"gate": {"metrics": ["ndcg@10", "recall@20", "coverage@10"]}}, "'coverage@10', not a quality metric"),
])
def test_overrides_beyond_the_bounds_are_rejected(overrides, message):
    assert message in rejection({"config_overrides": overrides})


def test_adding_quality_metrics_and_tightening_thresholds_stay_allowed():
    run = resolve_run({"min_change_vs_teacher": 0.5, "config_overrides": {"gate": {"metrics": ["ndcg@10", "recall@20", "mrr", "hitrate@10"],
                                                                                   "floors": {"mrr": 0.01}}}}, DUE, "manual")
    assert run["config"]["gate"]["metrics"] == ("ndcg@10", "recall@20", "mrr", "hitrate@10")


# ---------------------------------------------------------------- the operator's sources
def test_bounds_from_the_environment_are_honoured(monkeypatch):
    monkeypatch.setenv(GATE_BOUNDS_ENV, json.dumps({"min_change_vs_teacher": -0.2, "metric_families": ["ndcg", "recall"]}))
    # -0.15 is beyond the built-in -0.10 but within the operator's -0.2.
    assert resolve_run({"min_change_vs_teacher": -0.15}, DUE, "manual")["gate_bounds"]["min_change_vs_teacher"] == -0.2
    assert "gate.min_change_vs_teacher=-0.25 is below the operator's bound min_change_vs_teacher=-0.2" in rejection({"min_change_vs_teacher": -0.25})
    assert ("'mrr', outside the operator's bound metric_families=['ndcg', 'recall']"
            in rejection({"config_overrides": {"gate": {"metrics": ["ndcg@10", "recall@20", "mrr"]}}}))


def test_an_operator_bound_tighter_than_the_defaults_fails_default_runs(monkeypatch):
    # The operator demands the student match the teacher (0.0); the default -0.05 is below it.
    monkeypatch.setenv(GATE_BOUNDS_ENV, '{"min_change_vs_teacher": 0.0}')
    assert "gate.min_change_vs_teacher=-0.05 is below the operator's bound min_change_vs_teacher=0.0" in rejection({})


def test_the_airflow_variable_applies_over_the_environment(monkeypatch):
    monkeypatch.setenv(GATE_BOUNDS_ENV, '{"min_change_vs_teacher": -0.2, "required_metrics": ["ndcg@10"]}')
    bounds = load_gate_bounds('{"min_change_vs_teacher": -0.3}')
    assert (bounds.min_change_vs_teacher, bounds.required_metrics) == (-0.3, ("ndcg@10",))
    run = resolve_run({"min_change_vs_teacher": -0.25, "config_overrides": {"gate": {"metrics": ["ndcg@10"]}}}, DUE, "manual",
                      gate_bounds='{"min_change_vs_teacher": -0.3}')
    assert run["config"]["gate"]["metrics"] == ("ndcg@10",)


@pytest.mark.parametrize("source, message", [
    ("not json", r"\$RECSYS_GATE_BOUNDS must be a JSON object"),
    ("[-0.5]", r"\$RECSYS_GATE_BOUNDS must be a JSON object, got list"),
    ('{"min_change_vs_teacherr": -0.5}', r"unknown setting\(s\) \['\$RECSYS_GATE_BOUNDS.min_change_vs_teacherr'\]"),
    ('{"min_change_vs_teacher": "low"}', r"\$RECSYS_GATE_BOUNDS.min_change_vs_teacher must be a number"),
    ('{"min_change_vs_teacher": -Infinity}', "min_change_vs_teacher must be a finite number"),
    ('{"metric_families": ["recall", "users"]}', "metric_families must be a non-empty subset"),
    ('{"metric_families": []}', "metric_families must be a non-empty subset"),
    ('{"required_metrics": ["trainable_params"]}', r"required_metrics \['trainable_params'\] are not quality metrics"),
    ('{"metric_families": ["recall"]}', r"required_metrics \['ndcg@10'\] are not quality metrics of the families \['recall'\]"),
    ('{"modes": ["lenient"]}', "modes must be a non-empty subset"),
])
def test_a_bad_operator_source_fails_loudly(source, message):
    with pytest.raises(ConfigError, match=message):
        load_gate_bounds(environ={GATE_BOUNDS_ENV: source})


def test_a_bad_variable_is_named_as_such():
    with pytest.raises(ConfigError, match="Variable recsys_gate_bounds must be a JSON object"):
        load_gate_bounds("{oops")


def test_check_gate_bounds_is_usable_without_a_run():
    check_gate_bounds(load_config(), GateBounds())
    with pytest.raises(ConfigError, match="gate.min_change_vs_teacher=-0.5 is below"):
        check_gate_bounds(load_config({"gate": {"min_change_vs_teacher": -0.5}}), GateBounds())


# ---------------------------------------------------------------- first run or missing champion
# The default ladder's two rungs, both as good as the teacher.
EVALUATION = {"models": {"teacher": {"ndcg@10": 0.2, "recall@20": 0.3}, "student_kd@5%": {"ndcg@10": 0.2, "recall@20": 0.3},
                         "student_kd@10%": {"ndcg@10": 0.2, "recall@20": 0.3}}}


def test_the_gate_promotes_the_cheapest_passing_rung_and_records_every_rung():
    run = resolve_run({"student_ladder": [0.02, 0.05, 0.1]}, DUE, "scheduled")
    rung = lambda ndcg, speed, params: {"ndcg@10": ndcg, "recall@20": 0.3, "throughput_users_per_s": speed,  # noqa: E731
                                        "trainable_params": params}
    # 2%: fastest but 0.15 is -25% of the teacher's 0.2 (allowed -5%); 5% passes at 30k users/s; 10% passes at 20k.
    evaluation = {"models": {"teacher": {"ndcg@10": 0.2, "recall@20": 0.3}, "student_kd@2%": rung(0.15, 50_000.0, 10),
                             "student_kd@5%": rung(0.199, 30_000.0, 50), "student_kd@10%": rung(0.2, 20_000.0, 100)}}
    gate = decide(run, evaluation)
    assert gate["blessed"] and gate["student_model"] == "student_kd@5%"
    assert gate["why"].startswith("student_kd@5% is the cheapest rung to serve that passes the gate (30,000 users/s)")
    assert [(r["name"], r["decision"], r["metrics"]["ndcg@10"]) for r in gate["ladder"]] == [
        ("student_kd@2%", "NOT_BLESSED", 0.15), ("student_kd@5%", "BLESSED", 0.199), ("student_kd@10%", "BLESSED", 0.2)]
    assert "ndcg@10: student 0.1500 vs teacher 0.2000" in gate["ladder"][0]["reasons"][0]


def test_an_empty_registry_is_a_first_run():
    run = resolve_run({}, DUE, "scheduled")
    gate = decide(run, EVALUATION)
    assert gate["blessed"] and gate["warnings"] == ["no champion yet: champion checks skipped (first run)"]


def test_versions_without_a_champion_record_reject():
    run = resolve_run({}, DUE, "scheduled")
    _, catalog, _ = settings(run)
    (Registry(catalog.registry_root).path / "1").mkdir(parents=True)  # a published version, no champion record
    assert champion_dir(catalog) is None
    gate = decide(run, EVALUATION)
    assert not gate["blessed"] and gate["warnings"] == []
    assert gate["reasons"] == ["no champion metrics, but the registry is not empty (it has published versions or a champion "
                               "record): the champion record is missing, unreadable or names an unpublished version, or the "
                               "champion was not evaluated; the gate fails closed"]


def test_an_unreadable_champion_record_rejects(monkeypatch):
    def unreadable(self):
        raise json.JSONDecodeError("Expecting value", "", 0)

    monkeypatch.setattr(Registry, "champion", unreadable)
    run = resolve_run({}, DUE, "scheduled")
    _, catalog, _ = settings(run)
    assert champion_dir(catalog) is None  # the run goes on without a champion ...
    assert [c["name"] for c in decide(run, EVALUATION)["checks"] if not c["passed"]] == ["champion_present"]  # ... and is rejected


def test_a_champion_record_naming_an_unpublished_version_rejects(monkeypatch):
    monkeypatch.setattr(Registry, "champion", lambda self: 3)
    run = resolve_run({}, DUE, "scheduled")
    _, catalog, _ = settings(run)
    assert champion_dir(catalog) is None
    assert not decide(run, EVALUATION)["blessed"]


# ---------------------------------------------------------------- Spark masters
def test_a_trigger_may_not_send_spark_work_to_a_master_the_operator_did_not_list(monkeypatch):
    monkeypatch.delenv(SPARK_MASTERS_ENV, raising=False)
    for section, master in (("soft_targets", "spark://10.9.8.7:7077"), ("features", "yarn"), ("soft_targets", "local[2]x")):
        with pytest.raises(ConfigError, match=re.escape(f"{section}.spark_master={master!r} is not a Spark master the operator allows")):
            resolve_run({"config_overrides": {section: {"spark_master": master}}}, DUE, "manual")
    for local in ("local", "local[2]", "local[*]", "local[4,2]"):
        assert resolve_run({"config_overrides": {"soft_targets": {"spark_master": local}}}, DUE, "manual")
    # The operator's own cluster, listed in the environment, is allowed.
    monkeypatch.setenv(SPARK_MASTERS_ENV, "spark://127.0.0.1:7077, spark://spark-master:7077")
    run = resolve_run({"config_overrides": {"soft_targets": {"spark_master": "spark://spark-master:7077"}}}, DUE, "manual")
    assert run["config"]["soft_targets"]["spark_master"] == "spark://spark-master:7077"
    with pytest.raises(ConfigError, match=re.escape("or one of ['spark://127.0.0.1:7077', 'spark://spark-master:7077']")):
        resolve_run({"config_overrides": {"soft_targets": {"spark_master": "spark://evil:7077"}}}, DUE, "manual")
