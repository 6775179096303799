"""Airflow plugin: each recsys run's HTML report, one click from the run.

The api-server serves ``/recsys/runs/<dag_id>/<run_id>/report``: the report whose path the
run's ``report`` task returned (its XCom, the run's recorded lineage), if it lies inside
``$RECSYS_DATA_ROOT`` once symlinks are followed. Only users allowed to read the DAG's runs
get it (the UI's login cookie or a Bearer token). The run page shows it in a "Run report"
tab, and the run's note links to it.

Install by pointing ``[core] plugins_folder`` at this folder (``make services``, ``make
airflow`` and the Docker image do).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from deploy.airflow_api import REPORT_TASK, REPORTS_PREFIX  # noqa: E402  (standard library only)

app = FastAPI(title="Recsys run reports")


def _data_root() -> Path:
    return Path(os.environ.get("RECSYS_DATA_ROOT") or PROJECT_ROOT / "data").resolve()


def _report_path(dag_id: str, run_id: str) -> Path:
    from sqlalchemy import select

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(select(XComModel).where(XComModel.dag_id == dag_id, XComModel.run_id == run_id,
                                                      XComModel.task_id == REPORT_TASK, XComModel.key == "return_value")).first()
        value = XComModel.deserialize_value(row) if row is not None else None
    if not isinstance(value, dict) or "html" not in value:
        raise HTTPException(404, f"run {run_id} of {dag_id} has no report (yet): its '{REPORT_TASK}' task has not succeeded")
    path = Path(value["html"]).resolve()
    if not path.is_relative_to(_data_root()) or not path.is_file():
        raise HTTPException(404, f"the report of run {run_id} is not a file inside the data root")
    return path


@app.get("/runs/{dag_id}/{run_id}/report", dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN))])
def run_report(dag_id: str, run_id: str) -> FileResponse:
    """The run's HTML report."""
    return FileResponse(_report_path(dag_id, run_id), media_type="text/html")


class RecsysReportsPlugin(AirflowPlugin):
    name = "recsys_reports"
    fastapi_apps = [{"app": app, "url_prefix": REPORTS_PREFIX, "name": "Recsys run reports"}]
    # A "Run report" tab on every run's page ({DAG_ID} and {RUN_ID} are filled in by the UI).
    external_views = [{"name": "Run report", "href": REPORTS_PREFIX + "/runs/{DAG_ID}/{RUN_ID}/report",
                       "destination": "dag_run", "url_route": "recsys_report"}]
