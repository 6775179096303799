"""
### Recommender distillation, nightly

Raw user-behaviour logs -> **validated** Spark features -> TFRS **teacher** -> batch **soft
targets** (Parquet) -> distilled **student** -> evaluation against teacher, champion and
baselines on one held-out split -> **gate** -> promote to the registry, or record the
rejection -> run **report**.

* A rejected student shows as `promote` *skipped* and `record_rejection` run; the `gate`
  task's log and its `gate_result` XCom list every failed check with its numbers.
* Trigger by hand with params (date, window, epochs, T, alpha, beta, gate thresholds,
  reuse of the teacher). `data_root` must stay inside `$RECSYS_DATA_ROOT`.
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
from airflow.sdk import Asset, Param, dag, get_current_context, task

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # tasks import the project's `pipeline` package
    sys.path.insert(0, str(PROJECT_ROOT))

DATA_ROOT = Path(os.environ.get("RECSYS_DATA_ROOT") or PROJECT_ROOT / "data")
SPARK_CONN_ID = os.environ.get("RECSYS_SPARK_CONN_ID", "recsys_spark")
SCHEDULE = os.environ.get("RECSYS_SCHEDULE", "0 2 * * *")

FEATURES = Asset(name="recsys_features", uri=f"file://{DATA_ROOT}/features")
TEACHER = Asset(name="recsys_teacher", uri=f"file://{DATA_ROOT}/models/teacher")
SOFT_TARGETS = Asset(name="recsys_soft_targets", uri=f"file://{DATA_ROOT}/soft_targets")
STUDENT = Asset(name="recsys_student", uri=f"file://{DATA_ROOT}/registry/recsys_student")

NUMBER_OR_NULL = ["null", "number"]
PARAMS = {
    "ds": Param(None, type=["null", "string"], format="date", description="Date to process (YYYY-MM-DD); empty: the run's logical date."),
    "window_days": Param(None, type=["null", "integer"], minimum=1, description="Days of raw logs read, ending at ds."),
    "teacher_epochs": Param(None, type=["null", "integer"], minimum=1, description="Most teacher epochs (early stopping)."),
    "student_epochs": Param(None, type=["null", "integer"], minimum=1, description="Student epochs."),
    "temperature": Param(None, type=NUMBER_OR_NULL, exclusiveMinimum=0, description="Distillation temperature T."),
    "alpha": Param(None, type=NUMBER_OR_NULL, minimum=0, maximum=1, description="Weight of the hard loss (1 - alpha: soft loss)."),
    "beta": Param(None, type=NUMBER_OR_NULL, minimum=0, description="Weight of the hint loss."),
    "min_change_vs_teacher": Param(None, type=NUMBER_OR_NULL, description="Gate: signed minimum change of the student against the teacher (-0.1 = at most 10% below)."),
    "min_change_vs_champion": Param(None, type=NUMBER_OR_NULL, description="Gate: signed minimum change against the serving champion."),
    "reuse_teacher": Param(False, type="boolean", description="Reuse the teacher already trained on these features and settings."),
    "data_root": Param(None, type=["null", "string"], description="Data root; must be inside $RECSYS_DATA_ROOT."),
    "config_overrides": Param({}, type="object", description='Any other settings, e.g. {"train": {"top_k": 50}}.'),
}


@dag(
    dag_id="recsys_distillation",
    schedule=SCHEDULE,
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
    def resolve_config(params=None, ds=None, run_id=None) -> dict:
        from pipeline.run import resolve_run

        return resolve_run(params, ds, run_id)

    @task(retries=0, execution_timeout=dt.timedelta(minutes=10))
    def validate_raw(run: dict) -> dict:
        from pipeline.run import check_raw_window, settings

        ds, paths, cfg = settings(run)
        return check_raw_window(paths.raw, ds, cfg)

    @task
    def feature_job_args(run: dict) -> list[str]:
        from pipeline.run import spark_arguments

        return spark_arguments(run)

    @task(retries=0)
    def validate_features(run: dict) -> dict:
        from pipeline.run import check_features, settings

        ds, paths, _ = settings(run)
        return check_features(paths.features, ds)

    @task(outlets=[TEACHER])
    def train_teacher(run: dict) -> dict:
        from pipeline.run import settings
        from pipeline.train_teacher import train_teacher as train

        ds, paths, cfg = settings(run)
        return train(ds, paths, cfg, reuse_latest=run["reuse_teacher"])

    @task(outlets=[SOFT_TARGETS])
    def soft_targets(run: dict, teacher: dict) -> dict:
        from pipeline.run import settings
        from pipeline.soft_targets import generate_soft_targets

        ds, paths, cfg = settings(run)
        return generate_soft_targets(ds, paths, cfg, teacher["path"])

    @task
    def distill_student(run: dict, targets: dict) -> dict:
        from pipeline.distill import distill_student as distill
        from pipeline.run import settings

        ds, paths, cfg = settings(run)
        return distill(ds, paths, cfg, targets["path"])

    @task
    def evaluate(run: dict, teacher: dict, student: dict) -> dict:
        from pipeline.evaluate import evaluate_run
        from pipeline.run import champion_dir, settings

        ds, paths, cfg = settings(run)
        return evaluate_run(ds, paths, cfg, teacher["path"], student["path"], champion_dir=champion_dir(paths))

    @task.branch(retries=0)
    def gate(run: dict, evaluation: dict) -> str:
        from pipeline.run import decide

        result = decide(run, evaluation)
        get_current_context()["ti"].xcom_push(key="gate_result", value=result)
        return "promote" if result["blessed"] else "record_rejection"

    def gate_result() -> dict:
        return get_current_context()["ti"].xcom_pull(task_ids="gate", key="gate_result")

    @task(retries=0, outlets=[STUDENT])
    def promote(run: dict, teacher: dict, student: dict, evaluation: dict) -> dict:
        from pipeline.run import promote as publish

        return publish(run, teacher, student, evaluation, gate_result())

    @task(retries=0)
    def record_rejection(run: dict, teacher: dict, student: dict, evaluation: dict) -> dict:
        from pipeline.run import record_rejection as record

        return record(run, teacher, student, evaluation, gate_result())

    @task(trigger_rule="none_failed_min_one_success")
    def report(run: dict, teacher: dict, student: dict, evaluation: dict) -> dict:
        from pipeline.run import write_run_report

        promoted = get_current_context()["ti"].xcom_pull(task_ids="promote")
        return write_run_report(run, teacher, student, evaluation, gate_result(), promoted)

    run = resolve_config()
    checked = validate_raw(run)
    extract = SparkSubmitOperator(
        task_id="extract_features",
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
    targets = soft_targets(run, teacher)
    student = distill_student(run, targets)
    evaluation = evaluate(run, teacher, student)
    decision = gate(run, evaluation)
    promoted = promote(run, teacher, student, evaluation)
    rejected = record_rejection(run, teacher, student, evaluation)
    decision >> [promoted, rejected]
    [promoted, rejected] >> report(run, teacher, student, evaluation)


recsys_distillation()
