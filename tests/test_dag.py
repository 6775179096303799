"""The Airflow DAG: integrity, parameters, and end-to-end runs under ``airflow dags test``.

The end-to-end run uses a tiny synthetic log and a project-free ``AIRFLOW_HOME`` on SQLite in a
temporary directory. The same DAG on PostgreSQL, a real scheduler and a Spark cluster is
``tests/test_services.py``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.catalog import ArtifactNotFound, OutsideDataRoot
from pipeline.config import ConfigError, param_defaults
from pipeline.data.contract import RawWindowError
from pipeline.registry import Registry, RegistryError
from pipeline.steps.run import nightly_ds, resolve_run
from tests.helpers import DAG_DS, TINY_PARAMS, generate_tiny_logs

REPO = Path(__file__).resolve().parents[1]
UTC = dt.timezone.utc
DUE = dt.datetime(2024, 2, 1, 2, 0, tzinfo=UTC)  # the nightly run that processes DAG_DS
EXPECTED_EDGES = {
    ("resolve_config", t) for t in ("validate_raw", "feature_job_args", "validate_features", "train_teacher", "soft_targets",
                                    "student_ladder", "distill_student", "evaluate", "gate", "promote", "record_rejection",
                                    "report")
} | {
    ("validate_raw", "extract_features"), ("feature_job_args", "extract_features"), ("extract_features", "validate_features"),
    ("validate_features", "train_teacher"), ("train_teacher", "soft_targets"), ("soft_targets", "distill_student"),
    ("student_ladder", "distill_student"), ("distill_student", "chosen_student"), ("gate", "chosen_student"),
    ("train_teacher", "evaluate"), ("distill_student", "evaluate"), ("evaluate", "gate"), ("gate", "route"),
    ("route", "promote"), ("route", "record_rejection"), ("promote", "report"), ("record_rejection", "report"),
} | {(up, down) for up in ("train_teacher", "chosen_student", "evaluate", "gate") for down in ("promote", "record_rejection", "report")}


def load_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag.dags["recsys_distillation"]


def test_dag_imports_and_wires_the_expected_graph():
    dag = load_dag()
    edges = {(t.task_id, down) for t in dag.tasks for down in t.downstream_task_ids}
    assert edges == EXPECTED_EDGES
    assert (dag.catchup, dag.max_active_runs) == (False, 1)
    assert dag.doc_md and "gate" in dag.doc_md
    assert {"ds", "window_days", "distill_temperature", "alpha", "beta", "min_change_vs_teacher", "reuse_teacher", "data_root"} <= set(dag.params.keys())
    assert dag.get_task("extract_features")._conn_id == "recsys_spark"
    # The trigger form shows the settings a run will use, not blanks.
    assert {name: dag.params[name] for name in param_defaults()} == param_defaults()
    assert all(dag.get_task(t).doc_md for t in dag.task_ids), "every task has a one-line doc"
    assert dag.get_task("report").trigger_rule == "none_failed_min_one_success"
    assert dag.owner == "recsys-ml"


def test_a_run_past_its_deadline_is_flagged_and_the_deadline_is_configurable(monkeypatch):
    from airflow.sdk import DeadlineReference

    (alert,) = load_dag().deadline
    assert alert.reference == DeadlineReference.DAGRUN_QUEUED_AT and alert.interval == dt.timedelta(hours=6)
    monkeypatch.setenv("RECSYS_RUN_DEADLINE_MINUTES", "90")
    assert load_dag().deadline[0].interval == dt.timedelta(minutes=90)
    monkeypatch.setenv("RECSYS_RUN_DEADLINE_MINUTES", "0")
    assert not load_dag().deadline


def test_schedule_none_makes_a_manual_only_dag(monkeypatch):
    monkeypatch.setenv("RECSYS_SCHEDULE", "none")
    assert load_dag().schedule is None


def test_a_failed_or_retried_task_logs_one_line_with_its_cause(caplog):
    import types

    dag = load_dag()
    ti = types.SimpleNamespace(task_id="train_teacher", try_number=2, max_tries=2)
    context = {"ti": ti, "exception": ValueError("no features at /data/features/ds=2024-01-31: run extract_features\ndetails")}
    with caplog.at_level("ERROR"):
        dag.default_args["on_retry_callback"](context)
        dag.default_args["on_failure_callback"]({**context, "ti": types.SimpleNamespace(task_id="gate", try_number=1, max_tries=0)})
    assert [r.getMessage() for r in caplog.records] == [
        "train_teacher failed, will retry (try 2 of 3): ValueError: no features at /data/features/ds=2024-01-31: run extract_features",
        "gate failed (try 1 of 1): ValueError: no features at /data/features/ds=2024-01-31: run extract_features",
    ]


def failure_outcome(task, error: BaseException) -> tuple[str, list[dict]]:
    """What Airflow's task runner makes of ``error`` raised on a task's first try, with retries
    left, and what it logs about it: the failure path of every task in Airflow 3.3.2
    (``task_runner._handle_current_task_failed``, which consults the task's retry policy)."""
    import types

    import structlog
    from structlog.testing import capture_logs
    from airflow.sdk.execution_time.task_runner import _handle_current_task_failed

    ti = types.SimpleNamespace(task=task, try_number=1, end_date=None, rendered_map_index=None, stats_tags={},
                               _failure_metrics_emitted=False,
                               _ti_context_from_server=types.SimpleNamespace(max_tries=task.retries, should_retry=True))
    with capture_logs() as logs:
        _, state = _handle_current_task_failed(ti, error, structlog.get_logger())
    return state, logs


DETERMINISTIC = [
    ConfigError("distill.alpha must be in [0, 1], got 3"),
    OutsideDataRoot("/etc is outside the configured data root /data"),
    RawWindowError("no raw partitions in ds=2024-01-18..ds=2024-01-31"),
    ArtifactNotFound("no features at /data/features/ds=2024-01-31: run extract_features"),
    RegistryError("recsys has no version 7 (have [1, 2])"),
    ValueError("refusing to promote a student the gate did not bless: ['ndcg@10 below the teacher']"),
    KeyError("user_idx"),
    TypeError("unsupported operand type(s) for +: 'int' and 'str'"),
]


@pytest.mark.parametrize("error", DETERMINISTIC, ids=lambda error: type(error).__name__)
def test_a_deterministic_error_fails_at_once_with_its_reason(error):
    task = load_dag().get_task("train_teacher")
    assert task.retries == 2
    state, logs = failure_outcome(task, error)
    assert state == "failed", "retries are left, but a retry would fail the same way"
    (decision,) = [entry for entry in logs if entry["event"] == "Retry policy decision"]
    assert decision["action"] == "fail" and "not retried" in decision["reason"]


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), ConnectionResetError(104, "Connection reset by peer"),
                                   TimeoutError("timed out"), RuntimeError("Py4JNetworkError: Answer from Java side is empty")],
                         ids=lambda error: type(error).__name__)
def test_a_transient_error_is_retried(error):
    state, _ = failure_outcome(load_dag().get_task("train_teacher"), error)
    assert state == "up_for_retry"


def test_the_feature_job_keeps_its_retries():
    from airflow.sdk.exceptions import AirflowException

    # spark-submit's exit 1 is a bad input and a lost executor alike: it is retried.
    task = load_dag().get_task("extract_features")
    assert task.retries == 2
    assert failure_outcome(task, AirflowException("Cannot execute: spark-submit ... Error code is: 1."))[0] == "up_for_retry"


def test_every_task_fails_a_deterministic_error_at_once_and_retries_a_transient_one():
    from airflow.sdk import RetryAction

    # From the DAG's default_args, so a task added later cannot go without the policy.
    for task in load_dag().tasks:
        assert task.retry_policy is not None, task.task_id
        assert task.retry_policy.evaluate(ConfigError("bad"), 1, 3).action == RetryAction.FAIL, task.task_id
        assert task.retry_policy.evaluate(OSError("lost"), 1, 3).action != RetryAction.FAIL, task.task_id
        assert task.retries == 2, f"{task.task_id}: a transient error gets the DAG's retries"


PARAM_SECTIONS = {
    "Data": ["ds", "window_days", "data_root"],
    "Training": ["teacher_epochs", "student_epochs", "warm_start", "reuse_teacher"],
    "Distillation": ["distill_temperature", "alpha", "beta", "student_ladder"],
    "Gate": ["min_change_vs_teacher", "min_change_vs_champion"],
    "Advanced": ["config_overrides"],
}


def test_the_trigger_form_shows_every_param_titled_in_its_section():
    params = load_dag().params
    schemas = {name: params.get_param(name).schema for name in params}
    assert {name: schema.get("section") for name, schema in schemas.items()} == {
        name: section for section, names in PARAM_SECTIONS.items() for name in names}
    assert all(schema.get("title") for schema in schemas.values()), "every param has a title"
    assert len({schema["title"] for schema in schemas.values()}) == len(schemas), "titles are distinct"
    assert all(params.get_param(name).description for name in params), "every param keeps its description"
    # The form shows sections in the order their first param comes.
    assert list(dict.fromkeys(schema["section"] for schema in schemas.values())) == list(PARAM_SECTIONS)


def test_params_outside_the_data_root_are_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_DATA_ROOT", str(tmp_path / "data"))
    for outside in ("/etc", "../elsewhere", str(tmp_path / "data-other")):
        with pytest.raises(ConfigError, match="outside the configured data root"):
            resolve_run({"data_root": outside}, DUE, "manual")
    inside = resolve_run({"data_root": "nightly", "alpha": 0.7}, DUE, "manual")
    assert inside["data_root"] == str((tmp_path / "data" / "nightly").resolve())
    assert inside["overrides"]["distill"]["alpha"] == 0.7 and inside["run_key"].startswith(f"{DAG_DS}_")
    with pytest.raises(ConfigError, match="distill.alpha must be in"):
        resolve_run({"alpha": 3}, DUE, "manual")
    with pytest.raises(ConfigError, match="ds must be a date"):
        resolve_run({"ds": "31/01/2024"}, DUE, "manual")


def test_a_setting_given_in_config_overrides_is_not_replaced_by_a_param_left_at_its_default(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_DATA_ROOT", str(tmp_path / "data"))
    params = load_dag().params.dump()  # what every run's params carry: each Param's default, then the trigger's conf
    assert params["window_days"] == 30 and params["min_change_vs_champion"] == -0.02
    params["config_overrides"] = {"gate": {"min_change_vs_champion": 0.0}, "features": {"window_days": 7}}
    run = resolve_run(params, DUE, "manual")
    assert (run["config"]["gate"]["min_change_vs_champion"], run["config"]["features"]["window_days"]) == (0.0, 7)
    assert run["setting_sources"] == {"gate.min_change_vs_champion": "config_overrides", "features.window_days": "config_overrides"}
    # The same setting given two ways, differently, is an error naming both.
    with pytest.raises(ConfigError, match=r"window_days=14 \(param\) conflicts with config_overrides.features.window_days=7"):
        resolve_run({**params, "window_days": 14}, DUE, "manual")


def test_a_run_without_ds_processes_the_last_complete_utc_day():
    # Due at 02:00 on Nov 28: Nov 27 is the last complete day (Nov 28 has only begun).
    assert nightly_ds(dt.datetime(2026, 11, 28, 2, 0, tzinfo=UTC)) == "2026-11-27"
    assert nightly_ds(dt.datetime(2026, 11, 28, 0, 0, tzinfo=UTC)) == "2026-11-27"
    assert nightly_ds(dt.datetime(2026, 11, 28, 23, 59, tzinfo=UTC)) == "2026-11-27"
    # 01:00 at UTC+2 is 23:00 UTC on Nov 27, so Nov 26 is the last complete UTC day.
    assert nightly_ds(dt.datetime(2026, 11, 28, 1, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))) == "2026-11-26"
    with pytest.raises(ConfigError, match="time-zone aware"):
        nightly_ds(dt.datetime(2026, 11, 28, 2, 0))
    assert resolve_run({}, DUE, "scheduled")["ds"] == DAG_DS
    assert resolve_run({"ds": "2024-01-15"}, DUE, "manual")["ds"] == "2024-01-15"


def scheduled_runs(dag, start: dt.datetime, end: dt.datetime) -> list:
    """The runs the scheduler (and a backfill) creates between two logical dates, in order."""
    from airflow.serialization.serialized_objects import DagSerialization

    return list(DagSerialization.from_dict(DagSerialization.to_dict(dag)).iter_dagrun_infos_between(start, end))


def test_nightly_schedule_and_backfill_process_each_day_once_in_order():
    dag = load_dag()
    # The scheduler's nightly run due at 2026-11-28 02:00 processes 2026-11-27.
    runs = scheduled_runs(dag, dt.datetime(2026, 11, 26, tzinfo=UTC), dt.datetime(2026, 11, 27, 3, tzinfo=UTC))
    due = {run.run_after: nightly_ds(run.run_after) for run in runs}
    assert due[dt.datetime(2026, 11, 28, 2, 0, tzinfo=UTC)] == "2026-11-27"
    # A backfill over logical dates Jan 1..Jan 5 (02:00) processes exactly those days, once each, in order;
    # a run's logical date (its data interval's start) names the day it processes.
    runs = scheduled_runs(dag, dt.datetime(2024, 1, 1, tzinfo=UTC), dt.datetime(2024, 1, 5, 2, tzinfo=UTC))
    processed = [nightly_ds(run.run_after) for run in runs]
    assert processed == [f"2024-01-0{day}" for day in range(1, 6)]
    assert processed == [run.data_interval.start.date().isoformat() for run in runs]


@pytest.fixture(scope="module")
def tiny_logs(tmp_path_factory):
    data = tmp_path_factory.mktemp("dag") / "data"
    generate_tiny_logs(data / "raw")
    return data


def airflow_env(home: Path, data_root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({
        "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "RECSYS_DATA_ROOT": str(data_root), "AIRFLOW_CONN_RECSYS_SPARK": json.dumps({"conn_type": "spark", "host": "local[2]"}),
        # The operator's gate bounds, as an Airflow Variable: tiny models need a lenient teacher threshold.
        "AIRFLOW_VAR_RECSYS_GATE_BOUNDS": json.dumps({"min_change_vs_teacher": -1.0}),
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        # `airflow dags test` fails a successful run of a DAG with a deadline (Airflow 3.3.2; see the DAG file).
        "RECSYS_RUN_DEADLINE_MINUTES": "0",
    })
    return env


def airflow(env: dict, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "airflow"), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def task_states(env: dict, logical_date: str) -> dict[str, str]:
    code = ("import json; from airflow.models import DagRun, TaskInstance; from airflow.utils.session import create_session\n"
            "with create_session() as s:\n"
            f"    run = [r for r in s.query(DagRun).filter(DagRun.dag_id == 'recsys_distillation').all() if r.logical_date.date().isoformat() == '{logical_date}'][0]\n"
            "    print(json.dumps({t.task_id: str(t.state) for t in s.query(TaskInstance).filter(TaskInstance.run_id == run.run_id)}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_dag(env: dict, logical_date: str, conf: dict) -> subprocess.CompletedProcess:
    return airflow(env, "dags", "test", "recsys_distillation", logical_date, "-c", json.dumps(conf))


def check_blessed_then_rejected(env: dict, data_root: Path) -> None:
    migrated = airflow(env, "db", "migrate")
    assert migrated.returncode == 0, migrated.stderr[-3000:]

    # 1. A first run: no champion yet, a lenient teacher threshold (within the operator's
    #    bound, see airflow_env) -> BLESSED and promoted.
    first = run_dag(env, DAG_DS, {**TINY_PARAMS, "ds": DAG_DS, "min_change_vs_teacher": -1.0})
    assert first.returncode == 0, (first.stdout + first.stderr)[-5000:]
    states = task_states(env, DAG_DS)
    assert states["promote"].endswith("success") and states["record_rejection"].endswith("skipped"), states
    assert states["report"].endswith("success")
    registry = Registry(data_root / "registry")
    assert registry.versions() == [1] and registry.champion() == 1
    assert registry.runs()[0]["decision"] == "BLESSED"
    # The run record keeps each task's seconds for the trend across nights (every rung's too).
    seconds = registry.runs()[0]["seconds"]
    assert set(seconds["students"]) == {"student_kd@10%", "student_kd@30%"}, seconds
    assert all(seconds[k] > 0 for k in ("teacher", "soft_targets", "evaluate")) and all(seconds["students"].values()), seconds
    reports = list((data_root / "reports" / f"ds={DAG_DS}").glob("*/*/report.html"))
    assert len(reports) == 1 and "BLESSED" in reports[0].read_text()
    blessed_report = reports[0].read_text()

    # 2. Impossible thresholds (the student must beat the teacher by 1000%) -> NOT_BLESSED;
    #    promote is skipped, the rejection recorded, the champion unchanged.
    second = run_dag(env, "2024-02-01", {**TINY_PARAMS, "ds": DAG_DS, "reuse_teacher": True, "min_change_vs_teacher": 10.0})
    assert second.returncode == 0, (second.stdout + second.stderr)[-5000:]
    states = task_states(env, "2024-02-01")
    assert states["promote"].endswith("skipped") and states["record_rejection"].endswith("success"), states
    assert states["report"].endswith("success")
    assert registry.versions() == [1] and registry.champion() == 1
    rejected = [r for r in registry.runs() if r["decision"] == "NOT_BLESSED"]
    assert len(rejected) == 1 and "< allowed +1000.00%" in " ".join(rejected[0]["reasons"])
    # Each attempt has a report of its own: the rejection did not overwrite the blessed one.
    reports = sorted((data_root / "reports" / f"ds={DAG_DS}").glob("*/*/report.html"))
    assert len(reports) == 2 and blessed_report in [r.read_text() for r in reports]

    # 3. A manual trigger pointing outside the data root fails at its first task.
    outside = run_dag(env, "2024-02-02", {**TINY_PARAMS, "ds": DAG_DS, "data_root": "/etc"})
    assert "outside the configured data root" in outside.stdout + outside.stderr
    assert task_states(env, "2024-02-02")["resolve_config"].endswith("failed")
    assert registry.versions() == [1] and registry.champion() == 1

    # 4. A trigger below the operator's bound on the teacher threshold fails at its first task too.
    loose = run_dag(env, "2024-02-03", {**TINY_PARAMS, "ds": DAG_DS, "min_change_vs_teacher": -5.0})
    assert "gate.min_change_vs_teacher=-5.0 is below the operator's bound min_change_vs_teacher=-1.0" in loose.stdout + loose.stderr
    assert task_states(env, "2024-02-03")["resolve_config"].endswith("failed")
    assert registry.versions() == [1] and registry.champion() == 1


def test_end_to_end_on_sqlite(tiny_logs, tmp_path):
    data_root = tiny_logs.parent / "sqlite_data"
    (data_root).mkdir()
    shutil.copytree(tiny_logs / "raw", data_root / "raw")  # a symlink out of the data root would be refused
    check_blessed_then_rejected(airflow_env(tmp_path / "airflow", data_root), data_root)
