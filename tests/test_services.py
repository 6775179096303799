"""The DAG on real services: ``deploy/services.py`` starts a Spark standalone master with two
workers and Airflow (api-server, scheduler with LocalExecutor, dag-processor, triggerer) on
PostgreSQL; runs are triggered through the REST API as an operator would, and the UI is read
in a real browser (headless Chromium).

Needs PostgreSQL at 127.0.0.1:5432 and Java (CI has both); the browser test also needs
``/usr/bin/chromium`` (``.ci/run`` installs it). Each missing piece skips with its reason,
printed so that a skip is never silent. The data is tiny: the runs check the deployment, not
the models.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest

from deploy.airflow_api import AirflowAPI, report_url
from deploy.services import Settings, _descendants, _port_open, _start_time, password, service_env, start, status, stop
from pipeline.registry import Registry
from tests.helpers import DAG_DS, TINY_PARAMS, generate_tiny_logs

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "recsys_distillation"
CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = REPO / "screenshots"
RUN_TIMEOUT = 1200
# A Spark application: a count on the cluster, then, while it holds its executors, whether the
# cluster's secret (from the driver's configuration) is on any process's command line.
SPARK_APP = """
import json, sys
from pathlib import Path
from pyspark.sql import SparkSession

spark = SparkSession.builder.appName(sys.argv[1]).getOrCreate()
count = spark.range(100).count()
secret = spark.sparkContext.getConf().get("spark.authenticate.secret", "").encode()
command_lines = []
for path in Path("/proc").glob("[0-9]*/cmdline"):
    try:
        command_lines.append(path.read_bytes())
    except OSError:
        pass
print(json.dumps({"count": count, "executors": sum(b"CoarseGrainedExecutorBackend" in c for c in command_lines),
                  "secret_on_command_lines": sum(secret in c for c in command_lines) if secret else None}))
"""


def _skip(reason: str) -> None:
    print(f"\nSKIPPED: {reason}")
    pytest.skip(reason)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@dataclasses.dataclass
class Deployment:
    settings: Settings
    api: AirflowAPI

    @property
    def registry(self) -> Registry:
        return Registry(self.settings.data_root / "registry")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    try:
        import psycopg2

        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)
    except Exception as err:  # noqa: BLE001 - any failure means: no server to deploy on
        _skip(f"PostgreSQL at 127.0.0.1:5432 not reachable: {err}")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        _skip("no Java for the Spark cluster")
    admin.autocommit = True
    # The default: the services create their database and its own role, as the superuser of the admin URL.
    database = f"recsys_services_test_{uuid.uuid4().hex[:8]}"
    root = tmp_path_factory.mktemp("services")
    generate_tiny_logs(root / "data" / "raw")
    airflow_port, master, master_ui, worker_1, worker_2 = _free_ports(5)
    settings = Settings(home=root / "home", data_root=root / "data", database_name=database,
                        airflow_port=airflow_port, spark_master_port=master, spark_ui_port=master_ui,
                        spark_worker_ui_ports=(worker_1, worker_2), schedule="none")
    try:
        start(settings)
        api = AirflowAPI(settings.airflow_url, "admin", password(settings))
        _wait_for_dag(api)
        api.unpause(DAG_ID)
        # The operator's gate bounds (an Airflow Variable): tiny models need a lenient teacher threshold.
        api.set_variable("recsys_gate_bounds", json.dumps({"min_change_vs_teacher": -1.0}))
        yield Deployment(settings, api)
    finally:
        try:
            stop(settings)
        finally:
            with admin.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
                cur.execute(f"DROP ROLE IF EXISTS {database}")
            admin.close()


def _wait_for_dag(api: AirflowAPI, timeout: float = 180) -> None:
    import time

    deadline = time.monotonic() + timeout
    while api.dag(DAG_ID) is None:
        assert time.monotonic() < deadline, f"the dag-processor did not parse {DAG_ID} within {timeout} s"
        time.sleep(2)


def _ensure_running(deployment: Deployment) -> None:
    """Start the services again if a test stopped them (the stop test may run before any other)."""
    if not all(status(deployment.settings).values()):
        start(deployment.settings)
        _wait_for_dag(deployment.api)


@pytest.fixture(autouse=True)
def running(deployment) -> None:
    """Every test finds every service running, whatever ran before it."""
    _ensure_running(deployment)


@dataclasses.dataclass(frozen=True)
class TriggeredRun:
    run_id: str
    record: dict  # the DAG run, as the REST API returns it once finished
    states: dict  # task id -> state
    master: dict  # the Spark master's /json/ status, read right after the run (a restart would clear it)


def _run(deployment: Deployment, conf: dict) -> TriggeredRun:
    _ensure_running(deployment)
    run_id = deployment.api.trigger(DAG_ID, conf)
    record = deployment.api.wait(DAG_ID, run_id, RUN_TIMEOUT)
    master = json.load(urllib.request.urlopen(f"{deployment.settings.spark_ui_url}/json/", timeout=10))
    return TriggeredRun(run_id, record, deployment.api.task_states(DAG_ID, run_id), master)


@pytest.fixture(scope="module")
def blessed_run(deployment) -> TriggeredRun:
    """The deployment's first run, with lenient thresholds: it should bless and promote version 1."""
    return _run(deployment, {**TINY_PARAMS, "ds": DAG_DS, "min_change_vs_teacher": -1.0})


@pytest.fixture(scope="module")
def rejected_run(deployment, blessed_run) -> TriggeredRun:
    """A second run after the blessed one, reusing its teacher, whose thresholds no student can meet."""
    return _run(deployment, {**TINY_PARAMS, "ds": DAG_DS, "reuse_teacher": True, "min_change_vs_teacher": 10.0})


def test_a_triggered_run_is_blessed_with_its_features_computed_on_the_cluster(deployment, blessed_run):
    record, states, master = blessed_run.record, blessed_run.states, blessed_run.master
    assert record["state"] == "success", states
    assert states["promote"] == "success" and states["record_rejection"] == "skipped", states
    # The feature job was an application of the standalone master, with executors on its workers.
    assert len([w for w in master["workers"] if w["state"] == "ALIVE"]) == 2
    apps = [a for a in master["completedapps"] if a["name"] == "extract_features"]
    assert len(apps) == 1 and apps[0]["state"] == "FINISHED" and apps[0]["cores"] >= 1, master["completedapps"]
    assert deployment.registry.versions() == [1] and deployment.registry.champion() == 1
    # What the operator sees first: the decision, the headline metrics, a link to the report.
    assert "NDCG@10 student" in record["note"]
    assert record["note"].startswith(f"**BLESSED** ([Run report]({report_url(DAG_ID, blessed_run.run_id)})): ")
    # The Assets follow the run's data root.
    events = deployment.api.asset_events()
    assert {e["uri"] for e in events} == {f"file://{deployment.settings.data_root / d}"
                                          for d in ("features", "models/teacher", "soft_targets", "registry")}


def test_impossible_thresholds_end_not_blessed_and_keep_the_champion(deployment, rejected_run):
    record, states = rejected_run.record, rejected_run.states
    assert record["state"] == "success", states
    assert states["promote"] == "skipped" and states["record_rejection"] == "success", states
    assert deployment.registry.versions() == [1] and deployment.registry.champion() == 1
    assert record["note"].startswith("**NOT_BLESSED**") and "< allowed +1000.00%" in record["note"]


def test_the_ui_shows_the_run_its_gate_decision_and_report(deployment, blessed_run, rejected_run):
    if not Path(CHROMIUM).exists():
        _skip(f"no browser at {CHROMIUM} (Debian: apt-get install chromium; .ci/run does)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError as err:
        _skip(f"playwright not installed: {err}")
    SCREENSHOTS.mkdir(exist_ok=True)
    base = deployment.settings.airflow_url
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(base + "/")
            page.locator("input[name=username]").fill("admin")
            page.locator("input[name=password]").fill(password(deployment.settings))
            page.locator("button[type=submit]").click()
            page.wait_for_url(lambda url: "/auth/login" not in url)

            for name, run, decision in (("blessed", blessed_run, "BLESSED"), ("rejected", rejected_run, "NOT_BLESSED")):
                run_page = f"{base}/dags/{DAG_ID}/runs/{urllib.parse.quote(run.run_id, safe='')}"
                # The run's grid: its state and, in its note, the gate's decision.
                page.goto(run_page)
                expect(page.get_by_text(decision, exact=True).first).to_be_visible(timeout=60_000)
                expect(page.get_by_text("Success").first).to_be_visible()
                page.screenshot(path=str(SCREENSHOTS / f"run_{name}.png"))
                # The gate task's log: every check and the decision.
                page.goto(f"{run_page}/tasks/gate")
                expect(page.get_by_text(f"gate decision: {decision}").first).to_be_visible(timeout=60_000)
                page.screenshot(path=str(SCREENSHOTS / f"gate_log_{name}.png"))
                # The report, one click from the run: the note's link (a new tab) ...
                page.goto(run_page)
                with page.context.expect_page() as opened:
                    page.locator(f'a[href="{report_url(DAG_ID, run.run_id)}"]').click()
                report = opened.value
                expect(report.get_by_text(decision, exact=True).first).to_be_visible(timeout=60_000)
                report.close()
                # ... or the run page's "Run report" tab, inside Airflow's UI, its figures loaded.
                page.locator('a[href$="/plugin/recsys_report"]').click()
                tab = page.frame_locator("iframe").first
                expect(tab.get_by_text(decision, exact=True).first).to_be_visible(timeout=60_000)
                images = tab.locator("img")
                expect(images).to_have_count(2)
                for i in range(2):
                    images.nth(i).scroll_into_view_if_needed()
                    page.wait_for_function("img => img.complete", arg=images.nth(i).element_handle(), timeout=30_000)
                    width = images.nth(i).evaluate("img => img.naturalWidth")
                    assert width > 0, f"figure {images.nth(i).get_attribute('src')} of the {name} report did not load"
                images.first.scroll_into_view_if_needed()
                page.screenshot(path=str(SCREENSHOTS / f"report_{name}.png"))
        finally:
            browser.close()


def _get(url: str, token: str | None = None) -> tuple[int, Message, bytes]:
    """Status, headers (looked up case-insensitively) and body of a GET."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_the_report_route_needs_a_login_and_read_access(deployment, blessed_run):
    url = deployment.settings.airflow_url + report_url(DAG_ID, blessed_run.run_id)
    assert _get(url)[0] == 401
    # A user the auth manager grants nothing (a valid token, no role) is refused too.
    minted = subprocess.run(
        [sys.executable, "-c", "from airflow.api_fastapi.app import create_auth_manager\n"
         "from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser\n"
         "print(create_auth_manager().generate_jwt(SimpleAuthManagerUser(username='nobody', role=None)))"],
        env=service_env(deployment.settings), capture_output=True, text=True, timeout=120)
    assert minted.returncode == 0, minted.stderr[-2000:]
    assert _get(url, minted.stdout.strip().splitlines()[-1])[0] == 403
    status, headers, body = _get(url, deployment.api.token())
    assert status == 200 and "BLESSED" in body.decode()
    assert headers["X-Content-Type-Options"] == "nosniff" and "default-src 'none'" in headers["Content-Security-Policy"]


@pytest.fixture
def bait(deployment) -> Iterator[Path]:
    """A file of the data root holding a script, beside the raw items; removed afterwards, as a
    stray file in raw/items would fail the feature job of any later run."""
    path = deployment.settings.data_root / "raw" / "items" / "bait.html"
    path.write_text("<script>document.title = 'pwned'</script>")
    yield path
    path.unlink()


def test_a_tampered_xcom_cannot_make_the_report_route_serve_another_file(deployment, blessed_run, bait):
    run_id = blessed_run.run_id
    # The DAG's own user (role "user", its password in every task's environment) rewrites the
    # report task's XCom to name a file of the data root holding a script.
    tamperer = AirflowAPI(deployment.settings.airflow_url, "recsys", password(deployment.settings, "recsys"))
    tamperer.set_xcom(DAG_ID, run_id, "report", "return_value", {"html": str(bait), "markdown": str(bait), "dir": str(bait.parent)})
    base = deployment.settings.airflow_url + report_url(DAG_ID, run_id).rsplit("/", 1)[0]
    status, headers, body = _get(base + "/report", deployment.api.token())
    assert status == 200 and b"<script>" not in body and b"BLESSED" in body
    for name in ("bait.html", "items.parquet", "..%2F..%2F..%2Fraw%2Fitems%2Fbait.html", "summary.json"):
        assert _get(f"{base}/{name}", deployment.api.token())[0] == 404, name
    # The report's figures are served, as images.
    status, headers, body = _get(f"{base}/training_curves.png", deployment.api.token())
    assert status == 200 and headers["Content-Type"] == "image/png" and body.startswith(b"\x89PNG")


def test_airflow_uses_a_database_role_of_its_own_that_is_no_superuser(deployment):
    import psycopg2
    from sqlalchemy.engine import make_url

    settings = deployment.settings
    role = settings.database_name
    url = make_url(service_env(settings)["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])  # what every service was started with
    assert (url.username, url.database, bool(url.password)) == (role, role, True)
    conn = psycopg2.connect(host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user")
            assert cur.fetchone() == (False, False, False)
            cur.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
            assert cur.fetchone() == (role,)
            # `airflow db migrate` ran as that role, and the running services connect as it.
            cur.execute("SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'")
            assert cur.fetchall() == [(role,)]
            cur.execute("SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = current_database() "
                        "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")
            assert cur.fetchall() == [(role,)]
    finally:
        conn.close()


def test_only_a_spark_driver_with_the_clusters_secret_gets_executors(deployment, tmp_path):
    settings = deployment.settings
    app = tmp_path / "app.py"
    app.write_text(SPARK_APP)
    env = service_env(settings)  # what the DAG's tasks run spark-submit with
    without = {name: value for name, value in env.items() if name != "SPARK_CONF_DIR"}
    submit = [str(Path(env["SPARK_HOME"]) / "bin" / "spark-submit"), "--master", settings.spark_master_url,
              "--conf", "spark.ui.enabled=false"]
    drivers = {  # at once
        "with_the_secret": (env, []),
        "without_a_secret": (without, []),
        "with_a_wrong_secret": (without, ["--conf", "spark.authenticate=true", "--conf", "spark.authenticate.secret=guessed"]),
    }
    processes = {name: subprocess.Popen(submit + options + [str(app), name], env=driver_env, cwd=tmp_path, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
                 for name, (driver_env, options) in drivers.items()}
    refusal = f"Failed to connect to master 127.0.0.1:{settings.spark_master_port}"
    outputs = {}
    try:
        # A refused driver would retry for about a minute before giving up: its first refusal is enough.
        for name in ("without_a_secret", "with_a_wrong_secret"):
            watchdog = threading.Timer(180, os.killpg, (processes[name].pid, signal.SIGKILL))
            watchdog.start()
            seen = []
            for line in processes[name].stderr:
                seen.append(line)
                if refusal in line or "count" in line:
                    break
            watchdog.cancel()
            os.killpg(processes[name].pid, signal.SIGKILL)
            outputs[name] = (processes[name].stdout.read(), "".join(seen), processes[name].wait())
        outputs["with_the_secret"] = (*processes["with_the_secret"].communicate(timeout=300), processes["with_the_secret"].returncode)
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    for name in ("without_a_secret", "with_a_wrong_secret"):
        out, err, _ = outputs[name]
        assert "count" not in out, f"{name}: the cluster ran it: {out}"
        assert refusal in err, (name, err[-3000:])
    out, err, returncode = outputs["with_the_secret"]
    assert returncode == 0, err[-3000:]
    result = json.loads(out.splitlines()[-1])
    assert result["count"] == 100 and result["executors"] >= 1 and result["secret_on_command_lines"] == 0, result
    master = json.load(urllib.request.urlopen(f"{settings.spark_ui_url}/json/", timeout=10))
    assert {a["name"] for a in master["activeapps"] + master["completedapps"]} & set(drivers) == {"with_the_secret"}
    # The master read spark-defaults.conf: authentication on, the REST submission server (which ignores it) off.
    master_log = (settings.home / "logs" / "spark-master.log").read_text()
    assert "SecurityManager: authentication enabled" in master_log and "REST server" not in master_log


def test_start_and_stop_are_idempotent_and_stop_leaves_nothing_behind(deployment):
    settings = deployment.settings
    running = status(settings)
    assert all(running.values()), running
    start(settings)  # everything already runs: a no-op
    assert status(settings) == running
    processes = [p for pid in running.values() for p in (pid, *_descendants(pid))]
    assert set(stop(settings)) == set(running)
    assert not any(_start_time(pid) for pid in processes), "a process outlived stop"
    assert not any(_port_open(port) for port in settings.ports.values()), settings.ports
    assert stop(settings) == [] and not any(status(settings).values())

