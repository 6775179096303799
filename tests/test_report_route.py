"""The api-server's report route (``plugins/recsys_reports.py``): it finds a run's report
folder from the run itself and serves only that folder's report files, whatever a task's
XCom says. Authentication is Airflow's own (checked on real services in test_services.py);
here it is bypassed so that only the route's own choices are under test."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipeline.catalog import Catalog

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "recsys_distillation"
RUN_ID = "manual__2024-02-01T02:00:00+00:00"
KEY = "2024-01-31_0123456789abcdef"


@pytest.fixture
def plugin(monkeypatch):
    spec = importlib.util.spec_from_file_location("recsys_reports_under_test", REPO / "plugins" / "recsys_reports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def data(tmp_path, monkeypatch, plugin):
    """A data root with one run's report (HTML and a figure) and a file a tampered XCom might name."""
    root = tmp_path / "data"
    monkeypatch.setenv("RECSYS_DATA_ROOT", str(root))
    folder = Catalog(root).report("2024-01-31", KEY, RUN_ID)
    folder.mkdir(parents=True)
    (folder / "report.html").write_text('<h1>BLESSED</h1><img src="training_curves.png">')
    (folder / "training_curves.png").write_bytes(b"\x89PNG\r\n\x1a\nfigure")
    (folder / "summary.json").write_text("{}")
    items = root / "raw" / "items" / "items.html"
    items.parent.mkdir(parents=True)
    items.write_text("<script>alert(1)</script>")
    runs = {(DAG_ID, RUN_ID): types.SimpleNamespace(conf={})}
    xcom = {"run_key": KEY}
    monkeypatch.setattr(plugin, "_dag_run", lambda dag_id, run_id: runs.get((dag_id, run_id)))
    monkeypatch.setattr(plugin, "_resolved_run_key", lambda dag_id, run_id: xcom.get("run_key"))
    return types.SimpleNamespace(root=root, folder=folder, items=items, runs=runs, xcom=xcom)


@pytest.fixture
def client(plugin):
    plugin.app.dependency_overrides[plugin.read_runs] = lambda: None
    return TestClient(plugin.app)


def url(name: str = "report", dag_id: str = DAG_ID, run_id: str = RUN_ID) -> str:
    from urllib.parse import quote

    return f"/runs/{quote(dag_id, safe='')}/{quote(run_id, safe='')}/{name}"


def test_the_report_and_its_figures_are_served_with_their_types_and_a_strict_policy(data, client):
    page = client.get(url())
    assert page.status_code == 200 and "BLESSED" in page.text
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["x-content-type-options"] == "nosniff"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "img-src 'self'" in policy and "script-src" not in policy
    figure = client.get(url("training_curves.png"))  # the report's relative <img src> lands here
    assert figure.status_code == 200 and figure.headers["content-type"] == "image/png"
    assert figure.content.startswith(b"\x89PNG")


def test_nothing_but_the_runs_report_files_is_served(data, client, plugin):
    (data.folder / "linked.html").symlink_to(data.items)
    for name in ("summary.json", "linked.html", "missing.png", "..", "%2E%2E%2Fraw"):
        assert client.get(url(name)).status_code == 404, name
    # Traversal through the run id or the DAG id reaches no other folder.
    assert client.get(url(run_id="../../raw/items")).status_code == 404
    assert client.get(url(dag_id="other_dag")).status_code == 404  # a DAG that writes no reports
    assert client.get(url(run_id="manual__unknown")).status_code == 404


def test_a_tampered_xcom_cannot_widen_what_is_served(data, client, plugin):
    # What the old route trusted: the report task's XCom naming any file under the data root.
    data.xcom["run_key"] = str(data.items)
    page = client.get(url())
    assert page.status_code == 200 and "<script>" not in page.text and "BLESSED" in page.text
    # With two report folders of this run (resolved again with other settings), the XCom only
    # chooses between them; naming anything else serves nothing.
    other = Catalog(data.root).report("2024-01-31", "2024-01-31_fedcba9876543210", RUN_ID)
    other.mkdir(parents=True)
    (other / "report.html").write_text("<h1>NOT_BLESSED</h1>")
    assert client.get(url()).status_code == 409
    data.xcom["run_key"] = "2024-01-31_fedcba9876543210"
    assert "NOT_BLESSED" in client.get(url()).text


def test_a_run_whose_data_root_leaves_the_configured_one_is_refused(data, client, tmp_path):
    data.runs[(DAG_ID, RUN_ID)] = types.SimpleNamespace(conf={"data_root": str(tmp_path)})
    response = client.get(url())
    assert response.status_code == 404 and "not inside the data root" in response.text
