"""
### Recommender distillation, nightly

Raw user-behaviour logs -> **validated** Spark features -> TFRS **teacher** -> batch **soft
targets** (Parquet) -> distilled **student** -> evaluation against teacher, champion and
baselines on one held-out split -> **gate** -> promote to the registry, or record the
rejection -> run **report**.

* **Which day a run reads.** Without a `ds` param a run processes the last UTC day that
  was complete when it became due: the nightly run due at 02:00 on day D+1 (its data
  interval is D 02:00 -> D+1 02:00, its logical date D) processes day D; a manual run
  processes yesterday. A backfill of logical dates D1..Dn processes each of those days once.
* A rejected student shows as `promote` *skipped* and `record_rejection` run; the `gate`
  task's log and its XCom list every failed check with its numbers.
* A re-run of a date and settings already promoted adds no version and leaves the champion
  where it is, so an operator's rollback holds; every attempt is recorded in the registry
  (`python -m pipeline.registry list`). A student is promoted only if the champion is still
  the version the gate compared it with (a backfill may run beside the nightly run);
  otherwise `promote` logs and returns "not promoted: champion changed since evaluation".
* Trigger by hand with params (date, window, epochs, T, alpha, beta, gate thresholds,
  reuse of the teacher). `data_root` must stay inside `$RECSYS_DATA_ROOT`, and so must every
  path a task uses under it once symlinks are followed.
* The gate settings a trigger may use are bounded by the operator, not by the form: the
  Airflow Variable `recsys_gate_bounds` or `$RECSYS_GATE_BOUNDS` (JSON, e.g.
  `{"min_change_vs_teacher": -0.1}`). A trigger beyond them fails at `resolve_config`.
* Spark runs through the `recsys_spark` connection: `local[2]` by default, a cluster
  master URL in a real deployment; nothing else changes.
* **Retries.** A bad setting or input (`DETERMINISTIC_ERRORS` below) fails its task at once,
  its log saying why it was not retried; anything else (a lost disk, connection or executor)
  is retried twice with back-off.
* **Monitoring.** The run's note carries the gate decision, NDCG@10 of student, teacher and
  champion, and a link to the run's HTML report (also the run page's "Run report" tab, from
  `plugins/`); the note needs the connection `recsys_airflow_api` (an Airflow user allowed to
  edit runs). A failed or retried task logs one line with the cause. A run still going
  `$RECSYS_RUN_DEADLINE_MINUTES` (default 360; 0: no deadline) after it was queued is
  flagged: its note says so and the scheduler's callback logs an error.
* The report task's log and XCom give the HTML report's path.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.util
import logging
import os
import sys

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import (Asset, AssetAlias, CronDataIntervalTimetable, DeadlineAlert, DeadlineReference, ExceptionRetryPolicy, Param,
                         RetryAction, RetryRule, SyncCallback, Variable, dag, task)

from pipeline.catalog import ArtifactNotFound, OutsideDataRoot
from pipeline.config import GATE_BOUNDS_VARIABLE, ConfigError, param_defaults
from pipeline.data.contract import RawWindowError
from pipeline.registry import RegistryError
from pipeline.spark import with_class_archive

log = logging.getLogger(__name__)

SPARK_CONN_ID = os.environ.get("RECSYS_SPARK_CONN_ID", "recsys_spark")
API_CONN_ID = "recsys_airflow_api"  # an Airflow user that may edit runs: the run's note
SCHEDULE = os.environ.get("RECSYS_SCHEDULE", "0 2 * * *")  # "none": manual runs only
# The feature job's file in the installed `spark_jobs` package: spark-submit runs a file, which
# imports the project as every task does, from the environment the project is installed in.
FEATURE_JOB = importlib.util.find_spec("spark_jobs.extract_features").origin
# 0 turns the deadline off: `airflow dags test` (make demo) fails at the end of a successful
# run of a DAG with a deadline in Airflow 3.3.2 (it looks the DAG's alerts up by id, but holds
# the alerts themselves), so the demo and the in-process tests run without one.
RUN_DEADLINE = dt.timedelta(minutes=float(os.environ.get("RECSYS_RUN_DEADLINE_MINUTES", "360")))

# Each artifact's Asset is the folder under the run's own data root (a trigger may pick a
# data root inside $RECSYS_DATA_ROOT), so the tasks name it through an alias at run time.
FEATURES = AssetAlias("recsys_features")
TEACHER = AssetAlias("recsys_teacher")
SOFT_TARGETS = AssetAlias("recsys_soft_targets")
STUDENT = AssetAlias("recsys_student")

# Errors a retry cannot mend: the same params, inputs and settings raise them again, so the
# task fails at once with the reason instead of after every retry and its back-off. The one
# list of them; each with why. Subclasses come before their bases (the first matching rule wins).
DETERMINISTIC_ERRORS = {
    ConfigError: "a setting or trigger param is invalid or beyond the operator's gate bounds; the same params fail again",
    OutsideDataRoot: "a path resolves outside $RECSYS_DATA_ROOT; it resolves there again",
    RawWindowError: "the raw window breaks the data contract; the same files break it again",
    # A FileNotFoundError, so an OSError, but not a lost disk: only its upstream task publishes it.
    ArtifactNotFound: "an artifact the step needs is not published; a retry of this task does not publish it",
    RegistryError: "the registry refuses the operation (no such version, nothing to roll back to); it refuses it again",
    ValueError: "a bad value in the data or results (features not validated, a student the gate did not bless, NaN scores); "
                "it is there on every try",
    LookupError: "a key or user the data lacks (e.g. MissingSoftTargets); the data lacks it on every try",
    TypeError: "a value of the wrong type, a bug or a bad input; the same on every try",
}
# Everything else keeps the task's retries: OSError (a lost disk, mount or connection) by
# name, and by default Spark's and TensorFlow's runtime errors, a busy database, a failed
# spark-submit. A killed worker never reaches the policy: the scheduler retries its task.
RETRY_POLICY = ExceptionRetryPolicy(rules=[
    *(RetryRule(exception=error, action=RetryAction.FAIL, reason=f"{error.__name__}, not retried: {why}")
      for error, why in DETERMINISTIC_ERRORS.items()),
    RetryRule(exception=OSError, action=RetryAction.RETRY, reason="OSError: a lost disk, mount or connection may be back"),
])


def emit(outlet_events, alias: AssetAlias, path, ds: str) -> None:
    """Record an event of the Asset ``file://<path>`` (the artifact of day ``ds``) through ``alias``."""
    outlet_events[alias].add(Asset(uri=f"file://{path}"), extra={"ds": ds})


def set_note(dag_id: str, run_id: str, note: str) -> None:
    """Set the run's note through the REST API as the ``recsys_airflow_api`` connection's user;
    without that connection (e.g. under ``airflow dags test``) only log it."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    from deploy.airflow_api import AirflowAPI, AirflowAPIError

    try:
        conn = Connection.get(API_CONN_ID)
    except AirflowNotFoundException:
        log.info("run note (not set: no connection %s): %s", API_CONN_ID, note)
        return
    base = conn.host if "://" in (conn.host or "") else f"{conn.schema or 'http'}://{conn.host}"
    try:
        AirflowAPI(f"{base}:{conn.port}" if conn.port else base, conn.login, conn.password).set_note(dag_id, run_id, note)
    except AirflowAPIError as err:
        log.warning("run note not set (%s): %s", err, note)


def announce_failure(what: str, context) -> None:
    """One log line a person reads first: which task failed, which try, and why."""
    ti, error = context["ti"], context.get("exception")
    log.error("%s %s (try %s of %s): %s: %s", ti.task_id, what, ti.try_number, ti.max_tries + 1,
              type(error).__name__ if error else "error", str(error).splitlines()[0] if error and str(error) else "see above")


def flag_overdue(**kwargs) -> None:
    """The deadline's callback: the run is still going long after it was queued."""
    run = kwargs.get("context", {}).get("dag_run", {})
    message = f"**OVERDUE**: still running {RUN_DEADLINE} after it was queued (deadline {kwargs.get('context', {}).get('deadline', {}).get('deadline_time')})."
    log.error("recsys_distillation run %s: %s", run.get("dag_run_id"), message)
    if run.get("dag_run_id"):
        set_note(run.get("dag_id", "recsys_distillation"), run["dag_run_id"], message)

DEFAULT = param_defaults()
# The trigger form: one titled field per Param, in sections shown in the order of their first Param.
PARAMS = {
    "ds": Param(None, type=["null", "string"], format="date", title="Date to process", section="Data",
                description="Date to process (YYYY-MM-DD); empty: the last complete UTC day (yesterday)."),
    "window_days": Param(DEFAULT["window_days"], type="integer", minimum=1, title="Window (days)", section="Data",
                         description="Days of raw logs read, ending at ds."),
    "data_root": Param(None, type=["null", "string"], title="Data root", section="Data",
                       description="Data root; must be inside $RECSYS_DATA_ROOT (empty: that root)."),
    "teacher_epochs": Param(DEFAULT["teacher_epochs"], type="integer", minimum=1, title="Teacher epochs", section="Training",
                            description="Most teacher epochs (early stopping)."),
    "student_epochs": Param(DEFAULT["student_epochs"], type="integer", minimum=1, title="Student epochs", section="Training",
                            description="Most student epochs (early stopping)."),
    "warm_start": Param(DEFAULT["warm_start"], type="boolean", title="Warm start", section="Training",
                        description="Start from the previous night's models of the same settings (cold when there are none)."),
    "reuse_teacher": Param(False, type="boolean", title="Reuse the teacher", section="Training",
                           description="Reuse the teacher already trained on these features and settings."),
    "distill_temperature": Param(DEFAULT["distill_temperature"], type="number", exclusiveMinimum=0, title="Distillation temperature T", section="Distillation",
                                 description="Distillation temperature T of the soft loss."),
    "alpha": Param(DEFAULT["alpha"], type="number", minimum=0, maximum=1, title="Hard-loss weight alpha", section="Distillation",
                   description="Weight of the hard loss (1 - alpha: soft loss)."),
    "beta": Param(DEFAULT["beta"], type="number", minimum=0, title="Hint-loss weight beta", section="Distillation",
                  description="Weight of the hint loss."),
    "student_ladder": Param(DEFAULT["student_ladder"], type="array", items={"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                            minItems=1, title="Student ladder (parameter shares)", section="Distillation",
                            description="One distilled student per share of the teacher's parameters; the cheapest to serve that passes the gate is promoted."),
    "min_change_vs_teacher": Param(DEFAULT["min_change_vs_teacher"], type="number", title="Minimum change vs teacher", section="Gate",
                                   description="Gate: signed minimum change of the student against the teacher (-0.1 = at most 10% below); no lower than the operator's bound (Variable recsys_gate_bounds)."),
    "min_change_vs_champion": Param(DEFAULT["min_change_vs_champion"], type="number", title="Minimum change vs champion", section="Gate",
                                    description="Gate: signed minimum change against the serving champion; no lower than the operator's bound (Variable recsys_gate_bounds)."),
    "config_overrides": Param({}, type="object", title="Other settings (JSON)", section="Advanced",
                              description='Any other settings of pipeline/config, e.g. {"serving": {"top_k": 50}}; gate settings stay within the operator\'s bounds.'),
}


@dag(
    dag_id="recsys_distillation",
    # A data-interval timetable (not Airflow 3's default CronTriggerTimetable for a cron
    # string): each run covers the interval that ends when it is due, so its logical date is
    # the day it processes and a backfill of D1..Dn processes those days.
    schedule=None if SCHEDULE.strip().lower() in ("", "none") else CronDataIntervalTimetable(SCHEDULE, timezone="UTC"),
    start_date=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={
        "owner": "recsys-ml",
        "on_failure_callback": functools.partial(announce_failure, "failed"),
        "on_retry_callback": functools.partial(announce_failure, "failed, will retry"),
        # Every task, so a new one cannot go without: a deterministic error fails at once,
        # a transient one takes the retries.
        "retry_policy": RETRY_POLICY,
        "retries": 2,
        "retry_delay": dt.timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(minutes=20),
        "execution_timeout": dt.timedelta(hours=2),
    },
    params=PARAMS,
    deadline=DeadlineAlert(reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=RUN_DEADLINE,
                           callback=SyncCallback(flag_overdue), name="run overdue") if RUN_DEADLINE else None,
    doc_md=__doc__,
    tags=["recsys", "distillation"],
)
def recsys_distillation():
    @task
    def resolve_config(params=None, dag_run=None, run_id=None) -> dict:
        """Turn the trigger's params into the run's checked settings (and the date it processes), within the operator's gate bounds."""
        from pipeline.steps.run import resolve_run

        # Read here, not from params: the bounds must be out of reach of whoever triggers the run.
        bounds = Variable.get(GATE_BOUNDS_VARIABLE, default=None)
        return resolve_run(params, dag_run.run_after, run_id, gate_bounds=bounds)

    @task(execution_timeout=dt.timedelta(minutes=10))
    def validate_raw(run: dict) -> dict:
        """Pre-flight check of the raw window's partitions, files and columns (no Spark)."""
        from pipeline.steps.run import validate_raw as check

        return check(run)

    @task
    def feature_job_args(run: dict) -> list[str]:
        """The Spark feature job's arguments for this run."""
        from pipeline.steps.run import spark_arguments

        return spark_arguments(run)

    @task(outlets=[FEATURES])
    def validate_features(run: dict, outlet_events=None) -> dict:
        """Check that the published features passed their GX suite and every split has rows."""
        from pipeline.steps.run import check_features, settings

        ds, catalog, _ = settings(run)
        checked = check_features(catalog, ds)
        emit(outlet_events, FEATURES, catalog.features_root, ds)
        return checked

    @task(outlets=[TEACHER])
    def train_teacher(run: dict, outlet_events=None) -> dict:
        """Train and export the teacher (or reuse the one with the same identity)."""
        from pipeline.steps.run import settings
        from pipeline.steps.train_teacher import train_teacher as train

        ds, catalog, cfg = settings(run)
        teacher = train(ds, catalog, cfg, reuse=run["reuse_teacher"])
        emit(outlet_events, TEACHER, catalog.models_root / "teacher", ds)
        return teacher

    @task(outlets=[SOFT_TARGETS])
    def soft_targets(run: dict, teacher: dict, outlet_events=None) -> dict:
        """Write the teacher's top-K scores and embeddings for every training user to Parquet."""
        from pipeline.steps.run import settings
        from pipeline.steps.soft_targets import generate_soft_targets

        ds, catalog, cfg = settings(run)
        targets = generate_soft_targets(ds, catalog, cfg)
        emit(outlet_events, SOFT_TARGETS, catalog.soft_targets_root, ds)
        return targets

    @task
    def student_ladder(run: dict) -> list[float | None]:
        """The parameter budgets of the students to distil, one mapped task each."""
        from pipeline.steps.run import settings

        return list(settings(run)[2].ladder_rungs())

    # A mapped task takes its doc from here (the docstring reaches only unmapped ones).
    @task(map_index_template="{{ rung_name }}", doc_md="Distil the soft targets into one rung of the student ladder and export it.")
    def distill_student(run: dict, targets: dict, share: float | None) -> dict:
        """Distil the soft targets into one rung of the student ladder and export it."""
        from airflow.sdk import get_current_context

        from pipeline.steps.distill import distill_student as distill
        from pipeline.steps.run import settings

        ds, catalog, cfg = settings(run)
        name = cfg.rung_name(share)
        get_current_context()["rung_name"] = name  # the mapped task's name in the grid
        return {**distill(ds, catalog, cfg.rung(share)), "rung": share, "name": name, "soft_targets_seconds": targets.get("seconds")}

    @task
    def evaluate(run: dict, teacher: dict, students: list[dict]) -> dict:
        """Evaluate teacher, every student rung, champion and baselines on the same test split."""
        from pipeline.steps.evaluate import evaluate_run
        from pipeline.steps.run import champion_dir, settings, task_seconds

        ds, catalog, cfg = settings(run)
        exported = {"teacher": teacher["path"], **{student["name"]: student["path"] for student in students}}
        evaluation = evaluate_run(ds, catalog, cfg, exported, champion_dir=champion_dir(catalog))
        return {**evaluation, "task_seconds": task_seconds(teacher, students, evaluation)}

    @task
    def gate(run: dict, evaluation: dict) -> dict:
        """The validation gate: every check against the teacher and the champion, with its numbers."""
        from pipeline.steps.run import decide

        return decide(run, evaluation)

    @task
    def chosen_student(students: list[dict], gate_result: dict) -> dict:
        """The rung the gate chose: the cheapest that passes (or the largest, standing for a rejection)."""
        return next(student for student in students if student["name"] == gate_result["student_model"])

    @task.branch
    def route(gate_result: dict) -> str:
        """Promote a BLESSED student; record a NOT_BLESSED one."""
        return "promote" if gate_result["blessed"] else "record_rejection"

    @task(outlets=[STUDENT])
    def promote(run: dict, teacher: dict, student: dict, evaluation: dict, gate_result: dict, outlet_events=None) -> dict:
        """Publish the blessed student as the next registry version and make it the champion."""
        from pipeline.steps.run import promote as publish, settings

        promotion = publish(run, teacher, student, evaluation, gate_result)
        ds, catalog, _ = settings(run)
        emit(outlet_events, STUDENT, catalog.registry_root, ds)
        return promotion

    @task
    def record_rejection(run: dict, teacher: dict, student: dict, evaluation: dict, gate_result: dict) -> dict:
        """Record the rejection and its reasons; the champion stays."""
        from pipeline.steps.run import record_rejection as record

        return record(run, teacher, student, evaluation, gate_result)

    @task(trigger_rule="none_failed_min_one_success")
    def report(run: dict, teacher: dict, student: dict, evaluation: dict, gate_result: dict,
               promotion: dict | None, rejection: dict | None, dag_run=None) -> dict:
        """Write the run's HTML and Markdown report (its path is in the log and the XCom) and the run's note."""
        from deploy.airflow_api import report_url
        from pipeline.report import run_note
        from pipeline.steps.run import write_run_report

        written = write_run_report(run, teacher, student, evaluation, gate_result, promotion)
        set_note(dag_run.dag_id, dag_run.run_id,
                 run_note(gate_result, evaluation, promotion, report_url(dag_run.dag_id, dag_run.run_id)))
        return written

    run = resolve_config()
    checked = validate_raw(run)
    extract = SparkSubmitOperator(
        task_id="extract_features",
        doc_md="The Spark feature job: GX-validated features of the run's window, published atomically.",
        conn_id=SPARK_CONN_ID,
        application=FEATURE_JOB,
        application_args=feature_job_args(run),
        name="recsys_extract_features",
        conf=with_class_archive({}),  # the driver JVM starts from the installed class archive, if any
        env_vars={"PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable},
        execution_timeout=dt.timedelta(hours=1),
        # Keeps the DAG's retries: spark-submit fails with one AirflowException for any
        # non-zero exit, and the job exits 1 for a bad input and a crash (a lost executor or
        # driver) alike. Bad settings and a bad raw window have failed at once before it, at
        # resolve_config and validate_raw; what fails here is mostly GX or the cluster.
    )
    checked >> extract
    features = validate_features(run)
    extract >> features
    teacher = train_teacher(run)
    features >> teacher
    students = distill_student.partial(run=run, targets=soft_targets(run, teacher)).expand(share=student_ladder(run))
    evaluation = evaluate(run, teacher, students)
    gate_result = gate(run, evaluation)
    student = chosen_student(students, gate_result)
    promoted = promote(run, teacher, student, evaluation, gate_result)
    rejected = record_rejection(run, teacher, student, evaluation, gate_result)
    route(gate_result) >> [promoted, rejected]
    report(run, teacher, student, evaluation, gate_result, promoted, rejected)


recsys_distillation()
