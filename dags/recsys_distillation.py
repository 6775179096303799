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
  (`python -m pipeline.registry list`).
* Trigger by hand with params (date, window, epochs, T, alpha, beta, gate thresholds,
  reuse of the teacher). `data_root` must stay inside `$RECSYS_DATA_ROOT`, and so must every
  path a task uses under it once symlinks are followed.
* The gate settings a trigger may use are bounded by the operator, not by the form: the
  Airflow Variable `recsys_gate_bounds` or `$RECSYS_GATE_BOUNDS` (JSON, e.g.
  `{"min_change_vs_teacher": -0.1}`). A trigger beyond them fails at `resolve_config`.
* Spark runs through the `recsys_spark` connection: `local[2]` by default, a cluster
  master URL in a real deployment; nothing else changes.
* The report task's log and XCom give the HTML report's path.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import Asset, CronDataIntervalTimetable, Param, Variable, dag, task

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # tasks import the project's `pipeline` package
    sys.path.insert(0, str(PROJECT_ROOT))

from pipeline.catalog import Catalog  # noqa: E402  (light: paths and settings only)
from pipeline.config import GATE_BOUNDS_VARIABLE, param_defaults  # noqa: E402

CATALOG = Catalog(Path(os.environ.get("RECSYS_DATA_ROOT") or PROJECT_ROOT / "data"))
SPARK_CONN_ID = os.environ.get("RECSYS_SPARK_CONN_ID", "recsys_spark")
SCHEDULE = os.environ.get("RECSYS_SCHEDULE", "0 2 * * *")

FEATURES = Asset(name="recsys_features", uri=f"file://{CATALOG.features_root}")
TEACHER = Asset(name="recsys_teacher", uri=f"file://{CATALOG.models_root / 'teacher'}")
SOFT_TARGETS = Asset(name="recsys_soft_targets", uri=f"file://{CATALOG.soft_targets_root}")
STUDENT = Asset(name="recsys_student", uri=f"file://{CATALOG.registry_root}")

DEFAULT = param_defaults()
PARAMS = {
    "ds": Param(None, type=["null", "string"], format="date", description="Date to process (YYYY-MM-DD); empty: the last complete UTC day (yesterday)."),
    "window_days": Param(DEFAULT["window_days"], type="integer", minimum=1, description="Days of raw logs read, ending at ds."),
    "teacher_epochs": Param(DEFAULT["teacher_epochs"], type="integer", minimum=1, description="Most teacher epochs (early stopping)."),
    "student_epochs": Param(DEFAULT["student_epochs"], type="integer", minimum=1, description="Most student epochs (early stopping)."),
    "distill_temperature": Param(DEFAULT["distill_temperature"], type="number", exclusiveMinimum=0, description="Distillation temperature T of the soft loss."),
    "alpha": Param(DEFAULT["alpha"], type="number", minimum=0, maximum=1, description="Weight of the hard loss (1 - alpha: soft loss)."),
    "beta": Param(DEFAULT["beta"], type="number", minimum=0, description="Weight of the hint loss."),
    "min_change_vs_teacher": Param(DEFAULT["min_change_vs_teacher"], type="number", description="Gate: signed minimum change of the student against the teacher (-0.1 = at most 10% below); no lower than the operator's bound (Variable recsys_gate_bounds)."),
    "min_change_vs_champion": Param(DEFAULT["min_change_vs_champion"], type="number", description="Gate: signed minimum change against the serving champion; no lower than the operator's bound (Variable recsys_gate_bounds)."),
    "reuse_teacher": Param(False, type="boolean", description="Reuse the teacher already trained on these features and settings."),
    "data_root": Param(None, type=["null", "string"], description="Data root; must be inside $RECSYS_DATA_ROOT (empty: that root)."),
    "config_overrides": Param({}, type="object", description='Any other settings of pipeline/config, e.g. {"serving": {"top_k": 50}}; gate settings stay within the operator\'s bounds.'),
}


@dag(
    dag_id="recsys_distillation",
    # A data-interval timetable (not Airflow 3's default CronTriggerTimetable for a cron
    # string): each run covers the interval that ends when it is due, so its logical date is
    # the day it processes and a backfill of D1..Dn processes those days.
    schedule=CronDataIntervalTimetable(SCHEDULE, timezone="UTC"),
    start_date=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 2,
        "retry_delay": dt.timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(minutes=20),
        "execution_timeout": dt.timedelta(hours=2),
    },
    params=PARAMS,
    doc_md=__doc__,
    tags=["recsys", "distillation"],
)
def recsys_distillation():
    @task(retries=0)
    def resolve_config(params=None, dag_run=None, run_id=None) -> dict:
        """Turn the trigger's params into the run's checked settings (and the date it processes), within the operator's gate bounds."""
        from pipeline.run import resolve_run

        # Read here, not from params: the bounds must be out of reach of whoever triggers the run.
        bounds = Variable.get(GATE_BOUNDS_VARIABLE, default=None)
        return resolve_run(params, dag_run.run_after, run_id, gate_bounds=bounds)

    @task(retries=0, execution_timeout=dt.timedelta(minutes=10))
    def validate_raw(run: dict) -> dict:
        """Pre-flight check of the raw window's partitions, files and columns (no Spark)."""
        from pipeline.run import validate_raw as check

        return check(run)

    @task
    def feature_job_args(run: dict) -> list[str]:
        """The Spark feature job's arguments for this run."""
        from pipeline.run import spark_arguments

        return spark_arguments(run)

    @task(retries=0)
    def validate_features(run: dict) -> dict:
        """Check that the published features passed their GX suite and every split has rows."""
        from pipeline.run import check_features, settings

        ds, catalog, _ = settings(run)
        return check_features(catalog, ds)

    @task(outlets=[TEACHER])
    def train_teacher(run: dict) -> dict:
        """Train and export the teacher (or reuse the one with the same identity)."""
        from pipeline.run import settings
        from pipeline.train_teacher import train_teacher as train

        ds, catalog, cfg = settings(run)
        return train(ds, catalog, cfg, reuse=run["reuse_teacher"])

    @task(outlets=[SOFT_TARGETS])
    def soft_targets(run: dict, teacher: dict) -> dict:
        """Write the teacher's top-K scores and embeddings for every training user to Parquet."""
        from pipeline.run import settings
        from pipeline.soft_targets import generate_soft_targets

        return generate_soft_targets(*settings(run))

    @task
    def distill_student(run: dict, targets: dict) -> dict:
        """Distil the soft targets into the small student and export it."""
        from pipeline.distill import distill_student as distill
        from pipeline.run import settings

        return distill(*settings(run))

    @task
    def evaluate(run: dict, teacher: dict, student: dict) -> dict:
        """Evaluate teacher, student, champion and baselines on the same test split."""
        from pipeline.evaluate import evaluate_run
        from pipeline.run import champion_dir, settings

        ds, catalog, cfg = settings(run)
        exported = {"teacher": teacher["path"], "student_kd": student["path"]}
        return evaluate_run(ds, catalog, cfg, exported, champion_dir=champion_dir(catalog))

    @task(retries=0)
    def gate(run: dict, evaluation: dict) -> dict:
        """The validation gate: every check against the teacher and the champion, with its numbers."""
        from pipeline.run import decide

        return decide(run, evaluation)

    @task.branch(retries=0)
    def route(gate_result: dict) -> str:
        """Promote a BLESSED student; record a NOT_BLESSED one."""
        return "promote" if gate_result["blessed"] else "record_rejection"

    @task(retries=0, outlets=[STUDENT])
    def promote(run: dict, teacher: dict, student: dict, evaluation: dict, gate_result: dict) -> dict:
        """Publish the blessed student as the next registry version and make it the champion."""
        from pipeline.run import promote as publish

        return publish(run, teacher, student, evaluation, gate_result)

    @task(retries=0)
    def record_rejection(run: dict, teacher: dict, student: dict, evaluation: dict, gate_result: dict) -> dict:
        """Record the rejection and its reasons; the champion stays."""
        from pipeline.run import record_rejection as record

        return record(run, teacher, student, evaluation, gate_result)

    @task(trigger_rule="none_failed_min_one_success")
    def report(run: dict, teacher: dict, student: dict, evaluation: dict, gate_result: dict,
               promotion: dict | None, rejection: dict | None) -> dict:
        """Write the run's HTML and Markdown report (its path is in the log and the XCom)."""
        from pipeline.run import write_run_report

        return write_run_report(run, teacher, student, evaluation, gate_result, promotion)

    run = resolve_config()
    checked = validate_raw(run)
    extract = SparkSubmitOperator(
        task_id="extract_features",
        doc_md="The Spark feature job: GX-validated features of the run's window, published atomically.",
        conn_id=SPARK_CONN_ID,
        application=str(PROJECT_ROOT / "spark_jobs" / "extract_features.py"),
        application_args=feature_job_args(run),
        name="recsys_extract_features",
        env_vars={"PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable, "PYTHONPATH": str(PROJECT_ROOT)},
        outlets=[FEATURES],
        execution_timeout=dt.timedelta(hours=1),
    )
    checked >> extract
    features = validate_features(run)
    extract >> features
    teacher = train_teacher(run)
    features >> teacher
    student = distill_student(run, soft_targets(run, teacher))
    evaluation = evaluate(run, teacher, student)
    gate_result = gate(run, evaluation)
    promoted = promote(run, teacher, student, evaluation, gate_result)
    rejected = record_rejection(run, teacher, student, evaluation, gate_result)
    route(gate_result) >> [promoted, rejected]
    report(run, teacher, student, evaluation, gate_result, promoted, rejected)


recsys_distillation()
