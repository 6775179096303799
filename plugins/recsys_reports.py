"""Airflow plugin: each recsys run's HTML report and its figures, one click from the run.

The api-server serves ``/recsys/runs/<dag_id>/<run_id>/report`` (the report) and
``/recsys/runs/<dag_id>/<run_id>/<file>`` (its figures, which the report names relatively).
The folder is found from the run itself, never from anything a task or a user wrote: the
run must exist, belong to a DAG that writes these reports, and its data root comes from the
run's trigger conf, checked like ``resolve_config`` does; the catalogue then names the
report folder of that run id (:meth:`pipeline.catalog.Catalog.reports_of`). Only the files
directly in that folder with a report's suffix are served, with their content type,
``X-Content-Type-Options: nosniff`` and a Content-Security-Policy that lets the page load
only its own images and styles (no scripts, no other origins, framed only by the UI).

Only users allowed to read the DAG's runs get it (the UI's login cookie or a Bearer token).
The run page shows it in a "Run report" tab, and the run's note links to it.

Install by pointing ``[core] plugins_folder`` at this folder (``make services``, ``make
airflow`` and the Docker image do).
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin

from deploy.airflow_api import REPORT_TASK, REPORTS_PREFIX

# The DAGs whose runs write these reports: a run id of another DAG names none of them.
REPORT_DAGS = frozenset({"recsys_distillation"})
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".png": "image/png", ".md": "text/markdown; charset=utf-8"}
SERVED_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'self'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "private, no-store",
}

app = FastAPI(title="Recsys run reports")
read_runs = requires_access_dag("GET", DagAccessEntity.RUN)


def report_dir(dag_id: str, run_id: str) -> Path:
    """The report folder of run ``run_id`` of ``dag_id``, from the run's own record.

    Raises:
        HTTPException: 404 when the DAG writes no reports, the run does not exist, its data
            root is not inside ``$RECSYS_DATA_ROOT``, or it has no report yet; 409 when the
            run wrote reports under several settings and its ``resolve_config`` does not
            name one of them.
    """
    from pipeline.catalog import Catalog, OutsideDataRoot, configured_data_root, run_data_root
    from pipeline.config import ConfigError

    if dag_id not in REPORT_DAGS:
        raise HTTPException(404, f"{dag_id} writes no recsys reports")
    dag_run = _dag_run(dag_id, run_id)
    if dag_run is None:
        raise HTTPException(404, f"{dag_id} has no run {run_id}")
    try:
        catalog = Catalog(run_data_root((dag_run.conf or {}).get("data_root")), allowed=configured_data_root())
        found = catalog.reports_of(run_id)
    except (ConfigError, OutsideDataRoot) as err:
        raise HTTPException(404, f"the reports of run {run_id} are not inside the data root: {err}") from None
    if len(found) > 1:  # the run was resolved again with other settings: pick the one its resolve_config names
        key = _resolved_run_key(dag_id, run_id)
        found = [path for path in found if path.parent.name == key]
        if len(found) != 1:
            raise HTTPException(409, f"run {run_id} wrote reports under several settings; none is the one it resolved last")
    if not found or not (found[0] / "report.html").is_file():
        raise HTTPException(404, f"run {run_id} of {dag_id} has no report (yet): its '{REPORT_TASK}' task has not succeeded")
    return found[0]


def _dag_run(dag_id: str, run_id: str):
    from sqlalchemy import select

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        dag_run = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)).first()
        if dag_run is not None:
            session.expunge(dag_run)
        return dag_run


def _resolved_run_key(dag_id: str, run_id: str) -> str | None:
    """The run_key in the run's resolve_config XCom: it can only choose among this run's own report folders."""
    from sqlalchemy import select

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(select(XComModel).where(XComModel.dag_id == dag_id, XComModel.run_id == run_id,
                                                      XComModel.task_id == "resolve_config", XComModel.key == "return_value")).first()
        value = XComModel.deserialize_value(row) if row is not None else None
    return value.get("run_key") if isinstance(value, dict) else None


def serve(folder: Path, name: str) -> FileResponse:
    """``folder/name`` if it is a report's file directly in ``folder`` (never a link out of it)."""
    suffix = Path(name).suffix
    path = folder / name
    if not SERVED_NAME.match(name) or suffix not in CONTENT_TYPES or path.is_symlink() or not path.is_file():
        raise HTTPException(404, f"{name!r} is not a file of this run's report")
    return FileResponse(path, media_type=CONTENT_TYPES[suffix], headers=HEADERS)


@app.get("/runs/{dag_id}/{run_id}/report", dependencies=[Depends(read_runs)])
def run_report(dag_id: str, run_id: str) -> FileResponse:
    """The run's HTML report."""
    return serve(report_dir(dag_id, run_id), "report.html")


@app.get("/runs/{dag_id}/{run_id}/{name}", dependencies=[Depends(read_runs)])
def run_report_file(dag_id: str, run_id: str, name: str) -> FileResponse:
    """A file of the run's report (its figures, its Markdown), by the name the report gives it."""
    return serve(report_dir(dag_id, run_id), name)


class RecsysReportsPlugin(AirflowPlugin):
    name = "recsys_reports"
    fastapi_apps = [{"app": app, "url_prefix": REPORTS_PREFIX, "name": "Recsys run reports"}]
    # A "Run report" tab on every run's page ({DAG_ID} and {RUN_ID} are filled in by the UI).
    external_views = [{"name": "Run report", "href": REPORTS_PREFIX + "/runs/{DAG_ID}/{RUN_ID}/report",
                       "destination": "dag_run", "url_route": "recsys_report"}]
