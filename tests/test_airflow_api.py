"""``deploy/airflow_api.py`` against a fake api-server (an ``httpx.MockTransport``): what each
answer of Airflow turns into, and the token fetched once. No server and no network."""

from __future__ import annotations

import json
from typing import Callable

import httpx
import pytest

from deploy.airflow_api import AirflowAPI, AirflowAPIError, NotFound, Unauthorized, Unreachable

BASE = "http://airflow.test:8080"
TOKEN = "jwt-of-recsys"


class FakeAirflow:
    """Answers ``POST /auth/token`` with a token, and every other call with ``answer(request)``;
    records each request as ``(method, raw path with query, JSON body)``."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response]):
        self.answer = answer
        self.calls: list[tuple[str, str, object]] = []
        self.authorizations: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.calls.append((request.method, request.url.raw_path.decode(), body))
        if request.url.path == "/auth/token":
            return httpx.Response(201, json={"access_token": TOKEN})
        self.authorizations.append(request.headers.get("Authorization"))
        return self.answer(request)

    def api(self) -> AirflowAPI:
        return AirflowAPI(BASE, "recsys", "secret", transport=httpx.MockTransport(self))


def answering(status: int, payload=None) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, json=payload)


def test_the_token_is_fetched_once_and_sent_with_every_call():
    airflow = FakeAirflow(answering(200, {"state": "running", "task_instances": [], "asset_events": []}))
    api = airflow.api()

    api.run("recsys_distillation", "manual__1")
    api.task_states("recsys_distillation", "manual__1")
    api.asset_events()
    assert api.token() == TOKEN

    logins = [call for call in airflow.calls if call[1] == "/auth/token"]
    assert logins == [("POST", "/auth/token", {"username": "recsys", "password": "secret"})]
    assert airflow.authorizations == [f"Bearer {TOKEN}"] * 3


def test_paths_are_quoted_and_queries_kept():
    airflow = FakeAirflow(answering(200, {}))
    airflow.api().set_note("recsys_distillation", "manual__2024-01-01T00:00:00+00:00/x", "BLESSED")

    # ':' '+' '/' of a run id stay escaped: the run id is one path segment.
    assert airflow.calls[-1] == ("PATCH", "/api/v2/dags/recsys_distillation/dagRuns/"
                                          "manual__2024-01-01T00%3A00%3A00%2B00%3A00%2Fx?update_mask=note", {"note": "BLESSED"})


@pytest.mark.parametrize("status, kind", [(404, NotFound), (401, Unauthorized), (403, Unauthorized), (500, AirflowAPIError)])
def test_an_error_answer_raises_its_type_with_method_path_status_and_answer(status, kind):
    api = FakeAirflow(answering(status, {"detail": "what Airflow said"})).api()

    with pytest.raises(kind) as raised:
        api.run("recsys_distillation", "manual__1")

    err = raised.value
    assert type(err) is kind  # a 500 is none of the subtypes
    assert (err.method, err.path, err.status) == ("GET", "/api/v2/dags/recsys_distillation/dagRuns/manual__1", status)
    assert "what Airflow said" in err.answer
    assert str(err).startswith(f"GET /api/v2/dags/recsys_distillation/dagRuns/manual__1: HTTP {status}: ")


def test_refused_credentials_raise_unauthorized_for_the_token():
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"detail": "Invalid credentials"})

    api = AirflowAPI(BASE, "recsys", "wrong", transport=httpx.MockTransport(refuse))
    with pytest.raises(Unauthorized, match=r"^POST /auth/token: HTTP 401: .*Invalid credentials") as raised:
        api.dag("recsys_distillation")
    assert raised.value.status == 401


@pytest.mark.parametrize("failure", [httpx.ConnectError("Connection refused"), httpx.ReadTimeout("timed out")])
def test_no_connection_or_no_answer_raises_unreachable(failure):
    def fail(request: httpx.Request) -> httpx.Response:
        raise failure

    api = AirflowAPI(BASE, "recsys", "secret", transport=httpx.MockTransport(fail))
    with pytest.raises(Unreachable, match=rf"^POST /auth/token: {BASE} not reachable \({type(failure).__name__}: ") as raised:
        api.unpause("recsys_distillation")
    assert (raised.value.method, raised.value.path, raised.value.status) == ("POST", "/auth/token", None)
    assert isinstance(raised.value, AirflowAPIError)  # what the DAG's set_note catches


def test_dag_is_none_until_the_dag_processor_parsed_it():
    assert FakeAirflow(answering(404, {"detail": "not found"})).api().dag("recsys_distillation") is None
    assert FakeAirflow(answering(200, {"dag_id": "recsys_distillation"})).api().dag("recsys_distillation") \
        == {"dag_id": "recsys_distillation"}


def test_dag_raises_every_error_but_not_found():
    with pytest.raises(Unauthorized):
        FakeAirflow(answering(403, {"detail": "forbidden"})).api().dag("recsys_distillation")


def test_set_variable_creates_a_missing_variable():
    def no_variable_yet(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "not found"}) if request.method == "PATCH" else httpx.Response(201, json={})

    airflow = FakeAirflow(no_variable_yet)
    airflow.api().set_variable("recsys_gate_bounds", '{"min_change_vs_teacher": -1.0}')

    body = {"key": "recsys_gate_bounds", "value": '{"min_change_vs_teacher": -1.0}'}
    assert airflow.calls[1:] == [("PATCH", "/api/v2/variables/recsys_gate_bounds", body), ("POST", "/api/v2/variables", body)]


def test_set_variable_replaces_an_existing_variable_without_creating_it():
    airflow = FakeAirflow(answering(200, {}))
    airflow.api().set_variable("recsys_gate_bounds", "{}")
    assert [call[:2] for call in airflow.calls[1:]] == [("PATCH", "/api/v2/variables/recsys_gate_bounds")]


def test_set_variable_does_not_create_on_another_error():
    airflow = FakeAirflow(answering(403, {"detail": "forbidden"}))
    with pytest.raises(Unauthorized):
        airflow.api().set_variable("recsys_gate_bounds", "{}")
    assert [call[0] for call in airflow.calls[1:]] == ["PATCH"]


def test_wait_returns_the_finished_run_and_names_the_states_of_an_unfinished_one():
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/taskInstances"):
            return httpx.Response(200, json={"task_instances": [{"task_id": "report", "state": "queued"}]})
        return httpx.Response(200, json={"state": "success" if "done" in request.url.path else "running"})

    api = FakeAirflow(answer).api()
    assert api.wait("recsys_distillation", "done", timeout=1, poll=0)["state"] == "success"
    with pytest.raises(AirflowAPIError, match=r"run stuck still running after 0 s: \{'report': 'queued'\}"):
        api.wait("recsys_distillation", "stuck", timeout=0, poll=0)
