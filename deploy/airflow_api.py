"""A small client of Airflow 3's REST API (v2), token from the auth manager.

Used by the services tool and its tests (trigger, poll, unpause, Variables) and by the DAG's
``report`` task (the run's note). On httpx, a dependency of Airflow itself: it is there in every
task process and in the api-server.

A failed call raises an :class:`AirflowAPIError` of the kind callers tell apart (:class:`NotFound`,
:class:`Unauthorized`, :class:`Unreachable`); catch the type, never match the message.
"""

from __future__ import annotations

import time
import urllib.parse
from typing import Any

import httpx

FINISHED = ("success", "failed")
# The api-server route of a run's report (served by plugins/recsys_reports.py from the XCom of this task).
REPORTS_PREFIX = "/recsys"
REPORT_TASK = "report"
ANSWER_CHARS = 1000  # of Airflow's answer kept in an error


def report_url(dag_id: str, run_id: str) -> str:
    """The path of a run's HTML report on the api-server."""
    return f"{REPORTS_PREFIX}/runs/{_q(dag_id)}/{_q(run_id)}/report"


class AirflowAPIError(RuntimeError):
    """A REST call failed, or a run did not finish in time.

    Attributes:
        method: The HTTP method of the failed call (None when no call failed).
        path: Its path, without the query.
        status: The HTTP status of Airflow's answer (None without one).
        answer: The start of Airflow's answer ("" without one).
    """

    def __init__(self, message: str, method: str | None = None, path: str | None = None,
                 status: int | None = None, answer: str = ""):
        super().__init__(message)
        self.method, self.path, self.status, self.answer = method, path, status, answer


class NotFound(AirflowAPIError):
    """HTTP 404: no such DAG, run, Variable, ... (yet)."""


class Unauthorized(AirflowAPIError):
    """HTTP 401 or 403: wrong credentials, an expired token, or a user without the permission."""


class Unreachable(AirflowAPIError):
    """No answer: the api-server refused the connection, or a timeout passed."""


def _http_error(method: str, path: str, response: httpx.Response) -> AirflowAPIError:
    kind = {404: NotFound, 401: Unauthorized, 403: Unauthorized}.get(response.status_code, AirflowAPIError)
    answer = response.text[:ANSWER_CHARS]
    return kind(f"{method} {path}: HTTP {response.status_code}: {answer}", method, path, response.status_code, answer)


class AirflowAPI:
    """Calls to one api-server as one user.

    Args:
        base_url: The api-server, e.g. ``http://127.0.0.1:8080``.
        username: A user of the auth manager.
        password: Its password.
        timeout: Seconds per HTTP call.
        transport: The httpx transport (tests pass an ``httpx.MockTransport``); None: the network.
    """

    def __init__(self, base_url: str, username: str, password: str, timeout: float = 30,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self._credentials = {"username": username, "password": password}
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport,
                                    headers={"Accept": "application/json"})
        self._token: str | None = None

    def close(self) -> None:
        """Close the client's connections."""
        self._client.close()

    def __enter__(self) -> AirflowAPI:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, method: str, path: str, body: Any = None, params: dict | None = None, auth: bool = True) -> Any:
        """Airflow's JSON answer (None if empty).

        Raises:
            NotFound: HTTP 404.
            Unauthorized: HTTP 401 or 403.
            Unreachable: No connection, or no answer within the timeout.
            AirflowAPIError: Any other answer than 2xx, or one that is not JSON.
        """
        headers = {"Authorization": f"Bearer {self.token()}"} if auth else None
        try:
            response = self._client.request(method, path, json=body, params=params, headers=headers)
        except httpx.TransportError as err:
            raise Unreachable(f"{method} {path}: {self.base_url} not reachable ({type(err).__name__}: {err})",
                              method, path) from err
        if not response.is_success:
            raise _http_error(method, path, response)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            answer = response.text[:ANSWER_CHARS]
            raise AirflowAPIError(f"{method} {path}: HTTP {response.status_code}, not JSON: {answer}",
                                  method, path, response.status_code, answer) from None

    def token(self) -> str:
        """A JWT for the REST API (``POST /auth/token``), fetched once."""
        if self._token is None:
            self._token = self._call("POST", "/auth/token", self._credentials, auth=False)["access_token"]
        return self._token

    def dag(self, dag_id: str) -> dict | None:
        """The DAG's record, or None while the dag-processor has not parsed it yet."""
        try:
            return self._call("GET", f"/api/v2/dags/{_q(dag_id)}")
        except NotFound:
            return None

    def unpause(self, dag_id: str) -> None:
        self._call("PATCH", f"/api/v2/dags/{_q(dag_id)}", {"is_paused": False}, params={"update_mask": "is_paused"})

    def set_xcom(self, dag_id: str, run_id: str, task_id: str, key: str, value: Any) -> None:
        """Replace a task's XCom (any user with edit access to the DAG's runs may)."""
        self._call("PATCH", f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}/xcomEntries/{_q(key)}",
                   {"value": value, "map_index": -1})

    def set_variable(self, key: str, value: str) -> None:
        """Create or replace an Airflow Variable."""
        try:
            self._call("PATCH", f"/api/v2/variables/{_q(key)}", {"key": key, "value": value})
        except NotFound:
            self._call("POST", "/api/v2/variables", {"key": key, "value": value})

    def trigger(self, dag_id: str, conf: dict) -> str:
        """Trigger a manual run (no logical date: the run's day comes from its params); its run id."""
        return self._call("POST", f"/api/v2/dags/{_q(dag_id)}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]

    def run(self, dag_id: str, run_id: str) -> dict:
        """The run's record: ``state``, ``note``, dates."""
        return self._call("GET", f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """``task_id -> state`` of the run's task instances."""
        listed = self._call("GET", f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances", params={"limit": 100})
        return {ti["task_id"]: ti["state"] for ti in listed["task_instances"]}

    def asset_events(self, limit: int = 100) -> list[dict]:
        """The latest Asset events (``uri``, ``source_task_id``, ``extra``, ...)."""
        return self._call("GET", "/api/v2/assets/events", params={"limit": limit})["asset_events"]

    def set_note(self, dag_id: str, run_id: str, note: str) -> None:
        """Set the run's note (Markdown, shown on the run's page; at most 1,000 characters)."""
        self._call("PATCH", f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}", {"note": note[:1000]},
                   params={"update_mask": "note"})

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
