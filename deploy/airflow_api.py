"""A small client of Airflow 3's REST API (v2), token from the auth manager.

Used by the services tool and its tests (trigger, poll, unpause, Variables) and by the DAG's
``report`` task (the run's note). Standard library only: it runs in any task process.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

FINISHED = ("success", "failed")
# The api-server route of a run's report (served by plugins/recsys_reports.py from the XCom of this task).
REPORTS_PREFIX = "/recsys"
REPORT_TASK = "report"


def report_url(dag_id: str, run_id: str) -> str:
    """The path of a run's HTML report on the api-server."""
    return f"{REPORTS_PREFIX}/runs/{_q(dag_id)}/{_q(run_id)}/report"


class AirflowAPIError(RuntimeError):
    """A REST call failed; the message has the method, path, status and Airflow's answer."""


class AirflowAPI:
    """Calls to one api-server as one user.

    Args:
        base_url: The api-server, e.g. ``http://127.0.0.1:8080``.
        username: A user of the auth manager.
        password: Its password.
        timeout: Seconds per HTTP call.
    """

    def __init__(self, base_url: str, username: str, password: str, timeout: float = 30):
        self.base_url = base_url.rstrip("/")
        self._credentials = {"username": username, "password": password}
        self._timeout = timeout
        self._token: str | None = None

    def _call(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            raise AirflowAPIError(f"{method} {path}: HTTP {err.code}: {err.read().decode(errors='replace')[:1000]}") from None
        except urllib.error.URLError as err:
            raise AirflowAPIError(f"{method} {path}: {self.base_url} not reachable ({err.reason})") from None
        return json.loads(raw) if raw else None

    def token(self) -> str:
        """A JWT for the REST API (``POST /auth/token``), fetched once."""
        if self._token is None:
            self._token = self._call("POST", "/auth/token", self._credentials, auth=False)["access_token"]
        return self._token

    def dag(self, dag_id: str) -> dict | None:
        """The DAG's record, or None while the dag-processor has not parsed it yet."""
        try:
            return self._call("GET", f"/api/v2/dags/{_q(dag_id)}")
        except AirflowAPIError as err:
            if "HTTP 404" in str(err):
                return None
            raise

    def unpause(self, dag_id: str) -> None:
        self._call("PATCH", f"/api/v2/dags/{_q(dag_id)}?update_mask=is_paused", {"is_paused": False})

    def set_xcom(self, dag_id: str, run_id: str, task_id: str, key: str, value: Any) -> None:
        """Replace a task's XCom (any user with edit access to the DAG's runs may)."""
        self._call("PATCH", f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}/xcomEntries/{_q(key)}",
                   {"value": value, "map_index": -1})

    def set_variable(self, key: str, value: str) -> None:
        """Create or replace an Airflow Variable."""
        try:
            self._call("PATCH", f"/api/v2/variables/{_q(key)}", {"key": key, "value": value})
        except AirflowAPIError as err:
            if "HTTP 404" not in str(err):
                raise
            self._call("POST", "/api/v2/variables", {"key": key, "value": value})

    def trigger(self, dag_id: str, conf: dict) -> str:
        """Trigger a manual run (no logical date: the run's day comes from its params); its run id."""
        return self._call("POST", f"/api/v2/dags/{_q(dag_id)}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]

    def run(self, dag_id: str, run_id: str) -> dict:
        """The run's record: ``state``, ``note``, dates."""
        return self._call("GET", f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """``task_id -> state`` of the run's task instances."""
        listed = self._call("GET", f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances?limit=100")
        return {ti["task_id"]: ti["state"] for ti in listed["task_instances"]}

    def asset_events(self, limit: int = 100) -> list[dict]:
        """The latest Asset events (``uri``, ``source_task_id``, ``extra``, ...)."""
        return self._call("GET", f"/api/v2/assets/events?limit={limit}")["asset_events"]

    def set_note(self, dag_id: str, run_id: str, note: str) -> None:
        """Set the run's note (Markdown, shown on the run's page; at most 1,000 characters)."""
        self._call("PATCH", f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}?update_mask=note", {"note": note[:1000]})

    def wait(self, dag_id: str, run_id: str, timeout: float, poll: float = 5) -> dict:
        """Poll the run until it succeeds or fails.

        Raises:
            AirflowAPIError: Still unfinished after ``timeout`` seconds (its task states are in the message).
        """
        deadline = time.monotonic() + timeout
        while True:
            record = self.run(dag_id, run_id)
            if record["state"] in FINISHED:
                return record
            if time.monotonic() > deadline:
                raise AirflowAPIError(f"run {run_id} still {record['state']} after {timeout:.0f} s: {self.task_states(dag_id, run_id)}")
            time.sleep(poll)


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")
