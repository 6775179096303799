"""What ``deploy/services.py`` prepares before any service starts (its secret files and its
database), and how it tells its processes from others (PID files, process trees).

No service is started here (the process tests start ``sleep``). The secret files are checked in
child processes that watch every file operation (a Python audit hook), so a secret readable by
others even for an instant is caught, and that can be killed in the middle of writing one; the
database tests need PostgreSQL at 127.0.0.1:5432 and skip, saying so, without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from deploy.services import (USERS, ServiceError, Settings, _descendants, _ensure_database, _start_time,
                             airflow_database_url, password, passwords_file, running_pid, service_env, services, stop)

REPO = Path(__file__).resolve().parents[1]
ADMIN = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)
# Every folder that holds a secret file, under the services' home.
SECRET_FOLDERS = ("secrets", "airflow", "spark/conf")

# A caller of the services' set-up, as `make services` and every `airflow` command run under it are:
# it prints the secrets service_env and password() give it. An audit hook checks, at every file
# operation of the process, that each file in a secret folder has mode 600 and the folder mode 700;
# with "kill", the process SIGKILLs itself at the first such operation after a secret file (or
# its temporary file) was created, that is between its creation and its content.
CALLER = r"""
import json, os, signal, stat, sys, time
from pathlib import Path

home, mode, go = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
os.umask(0o022)  # a usual umask: a file created with the default mode is readable by everyone
import sqlalchemy.engine  # noqa: F401 - imported before the hook, as deploy.services imports it later
from deploy import services

services.spark_home()
settings = services.Settings(home=home, data_root=home / "data")
folders = [home / name for name in FOLDERS]
violations, busy = [], False


def secret_files():
    for folder in folders:
        try:
            yield folder, [entry for entry in os.scandir(folder) if entry.name != ".lock"]
        except OSError:
            pass


def hook(event, args):
    global busy
    if busy or not event.startswith(("open", "os.")):
        return
    busy = True
    try:
        created = False
        for folder, entries in secret_files():
            if entries and stat.S_IMODE(os.stat(folder).st_mode) != 0o700:
                violations.append(f"{event}: {folder.name}/ has mode {oct(stat.S_IMODE(os.stat(folder).st_mode))}")
            for entry in entries:
                created = created or folder.name == "secrets"
                try:
                    entry_mode = stat.S_IMODE(entry.stat().st_mode)
                except FileNotFoundError:  # another caller renamed or removed it since the scan
                    continue
                if entry_mode != 0o600:
                    violations.append(f"{event}: {entry.name} has mode {oct(entry_mode)}")
        if mode == "kill" and created:
            os.kill(os.getpid(), signal.SIGKILL)
    finally:
        busy = False


sys.addaudithook(hook)
print("ready", flush=True)
while go and not os.path.exists(go):
    time.sleep(0.005)
env = services.service_env(settings)
spark_defaults = Path(env["SPARK_CONF_DIR"], "spark-defaults.conf") if "SPARK_CONF_DIR" in env else None
values = {
    "jwt_secret": env["AIRFLOW__API_AUTH__JWT_SECRET"],
    "api_secret_key": env["AIRFLOW__API__SECRET_KEY"],
    "database_password": sqlalchemy.engine.make_url(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).password,
    "recsys_connection_password": json.loads(env["AIRFLOW_CONN_RECSYS_AIRFLOW_API"])["password"],
    **{f"password_{user}": services.password(settings, user) for user in services.USERS},
    "spark_secret": dict(line.split(" ", 1) for line in spark_defaults.read_text().splitlines()
                         if line.startswith("spark.authenticate.secret "))["spark.authenticate.secret"]
                    if spark_defaults else None,
}
print(json.dumps({"values": values, "violations": violations}), flush=True)
""".replace("FOLDERS", repr(SECRET_FOLDERS))


def _callers(home: Path, count: int, mode: str = "call") -> list[subprocess.Popen]:
    """``count`` callers that start their set-up at the same moment (each waits for a go file)."""
    go = home.parent / f"go-{uuid.uuid4().hex[:6]}"
    processes = [subprocess.Popen([sys.executable, "-c", CALLER, str(home), mode, str(go)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(count)]
    for process in processes:
        assert process.stdout.readline().strip() == "ready", process.communicate()[1]
    go.touch()
    return processes


def _results(processes: list[subprocess.Popen]) -> list[dict]:
    results = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.splitlines()[-1]))
    return results


def _modes(home: Path) -> dict[str, str]:
    """Mode of every secret folder and of every file in it, by path relative to ``home``."""
    found = {}
    for name in SECRET_FOLDERS:
        folder = home / name
        found[f"{name}/"] = oct(stat.S_IMODE(folder.stat().st_mode))
        found.update({f"{name}/{entry.name}": oct(stat.S_IMODE(entry.stat().st_mode)) for entry in folder.iterdir()})
    return found


def test_every_secret_file_is_private_from_its_creation(tmp_path):
    home = tmp_path / "home"
    (home / "airflow").mkdir(parents=True, mode=0o755)  # as an earlier version's start made it
    (result,) = _results(_callers(home, 1))
    assert result["violations"] == [], "\n".join(result["violations"])
    assert all(result["values"].values()), result["values"]
    modes = _modes(home)
    assert {path for path in modes if not path.endswith("/")} == {
        "secrets/.lock", "secrets/jwt_secret", "secrets/api_secret_key", "secrets/spark_auth_secret",
        "secrets/database_password", "airflow/simple_auth_manager_passwords.json.generated", "spark/conf/spark-defaults.conf"}
    assert {path: mode for path, mode in modes.items() if mode != ("0o700" if path.endswith("/") else "0o600")} == {}


@pytest.mark.parametrize("crash", ["killed between creating a secret file and writing it",
                                   "an empty secret, as an earlier version left it when killed so"])
def test_after_a_crash_mid_write_every_caller_gets_the_same_new_secrets(tmp_path, crash):
    home = tmp_path / "home"
    if crash.startswith("killed"):
        writer = _callers(home, 1, mode="kill")[0]
        writer.communicate(timeout=120)
        assert writer.returncode == -signal.SIGKILL
    else:
        (home / "secrets").mkdir(parents=True, mode=0o700)
        (home / "secrets" / "jwt_secret").touch(mode=0o600)
    # What the crash left: a secret file (or its temporary file) with nothing in it.
    assert [p.name for p in (home / "secrets").iterdir() if p.name != ".lock" and p.stat().st_size == 0]

    results = _results(_callers(home, 3))

    values = results[0]["values"]
    assert all(result["values"] == values for result in results), [result["values"] for result in results]
    assert all(values.values()), values  # never '' (with which every Airflow process would derive its own key)
    assert values["password_recsys"] == values["recsys_connection_password"]
    assert all(result["violations"] == [] for result in results)
    # One generation, kept: the files hold what every caller got, and nothing half-written is left.
    secrets_dir = home / "secrets"
    assert {name: (secrets_dir / name).read_text() for name in ("jwt_secret", "api_secret_key", "database_password")} \
        == {name: values[name] for name in ("jwt_secret", "api_secret_key", "database_password")}
    assert json.loads((home / "airflow" / "simple_auth_manager_passwords.json.generated").read_text()) \
        == {user: values[f"password_{user}"] for user in USERS}
    assert [p.name for p in secrets_dir.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("path, content", [
    ("secrets/jwt_secret", b""),
    ("secrets/jwt_secret", b" \n"),
    ("secrets/jwt_secret", b"\xff\xfe\x00"),  # not text
    ("airflow/simple_auth_manager_passwords.json.generated", b""),
    ("airflow/simple_auth_manager_passwords.json.generated", b'{"admin": "'),
    ("airflow/simple_auth_manager_passwords.json.generated", b'["admin", "recsys"]'),
    ("spark/conf/spark-defaults.conf", b""),
])
def test_an_empty_or_unreadable_secret_counts_as_missing(tmp_path, path, content):
    settings = Settings(home=tmp_path / "home", data_root=tmp_path / "data")
    (settings.home / path).parent.mkdir(parents=True, mode=0o700)
    (settings.home / path).write_bytes(content)

    env = service_env(settings)

    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] and password(settings, "admin") and password(settings, "recsys")
    spark_defaults = (settings.home / "spark/conf/spark-defaults.conf").read_text().splitlines()
    assert "spark.authenticate true" in spark_defaults
    assert f"spark.authenticate.secret {(settings.home / 'secrets/spark_auth_secret').read_text()}" in spark_defaults
    assert service_env(settings) == env  # generated once, then kept


def test_valid_secrets_are_kept_and_only_a_blank_password_is_replaced(tmp_path):
    settings = Settings(home=tmp_path / "home", data_root=tmp_path / "data")
    (settings.home / "secrets").mkdir(parents=True, mode=0o700)
    (settings.home / "secrets" / "jwt_secret").write_text("kept-jwt-secret\n")
    settings.airflow_home.mkdir(mode=0o700)
    passwords_file(settings).write_text(json.dumps({"admin": "kept-admin-password", "recsys": " ", "someone": "theirs"}))

    env = service_env(settings)

    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == "kept-jwt-secret"
    kept = json.loads(passwords_file(settings).read_text())
    assert kept["admin"] == "kept-admin-password" and kept["someone"] == "theirs"
    assert kept["recsys"].strip() and kept["recsys"] == json.loads(env["AIRFLOW_CONN_RECSYS_AIRFLOW_API"])["password"]


def test_the_spark_secret_reaches_spark_through_its_conf_dir_only(tmp_path):
    settings = Settings(home=tmp_path / "home", data_root=tmp_path / "data")
    env = service_env(settings)
    secret = (settings.home / "secrets" / "spark_auth_secret").read_text()
    assert Path(env["SPARK_CONF_DIR"]) == settings.home / "spark" / "conf"
    assert (Path(env["SPARK_CONF_DIR"]) / "spark-defaults.conf").read_text().splitlines()[1:] == [
        "spark.authenticate true", f"spark.authenticate.secret {secret}",
        # The master's REST submission server takes drivers without the secret: off.
        "spark.master.rest.enabled false"]
    assert not any(secret in value for name, value in env.items() if name != "SPARK_CONF_DIR")
    assert not any(secret in arg for service in services(settings) for arg in service.command)


# ----------------------------------------------------------------------------- the metadata database


@pytest.fixture
def admin():
    try:
        import psycopg2

        conn = psycopg2.connect(**ADMIN)
    except Exception as err:  # noqa: BLE001 - any failure means: no server to create a database on
        print(f"\nSKIPPED: PostgreSQL at 127.0.0.1:5432 not reachable: {err}")
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 not reachable: {err}")
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def database_name(admin):
    name = f"recsys_setup_test_{uuid.uuid4().hex[:8]}"
    yield name
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        cur.execute(f"DROP ROLE IF EXISTS {name}")


def _one(admin, query: str, *args):
    with admin.cursor() as cur:
        cur.execute(query, args)
        return cur.fetchone()


def test_the_services_database_is_owned_by_a_role_of_its_own(tmp_path, admin, database_name):
    import psycopg2
    from sqlalchemy.engine import make_url

    settings = Settings(home=tmp_path / "home", data_root=tmp_path / "data", database_name=database_name)
    _ensure_database(settings)
    _ensure_database(settings)  # idempotent

    url = make_url(airflow_database_url(settings))
    secret = (settings.home / "secrets" / "database_password").read_text()
    assert (url.username, url.password, url.database, url.host, url.port) == (database_name, secret, database_name, "127.0.0.1", 5432)
    role = _one(admin, "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolpassword FROM pg_authid WHERE rolname = %s",
                database_name)
    assert role[:4] == (True, False, False, False)
    assert role[4].startswith(("SCRAM-SHA-256$", "md5")) and secret not in role[4]  # the server keeps a hash only
    assert _one(admin, "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", database_name) == (database_name,)
    conn = psycopg2.connect(host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE owned_here (x int)")  # what `airflow db migrate` does
            cur.execute("SELECT current_user")
            assert cur.fetchone() == (database_name,)
    finally:
        conn.close()


def test_a_database_of_another_owner_is_refused_with_the_way_out(tmp_path, admin, database_name):
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {database_name}")  # as an earlier version made it: owned by postgres
    settings = Settings(home=tmp_path / "home", data_root=tmp_path / "data", database_name=database_name)
    with pytest.raises(ServiceError, match=f"database {database_name} exists but is owned by postgres.*RECSYS_SERVICES_DB_URL"):
        _ensure_database(settings)


def test_the_operators_database_url_is_used_as_is(tmp_path, monkeypatch, admin):
    url = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
    monkeypatch.setenv("RECSYS_SERVICES_DB_URL", url)
    monkeypatch.setenv("RECSYS_SERVICES_HOME", str(tmp_path / "home"))
    settings = Settings.from_env()
    roles = _one(admin, "SELECT count(*) FROM pg_roles")
    _ensure_database(settings)
    assert service_env(settings)["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == url
    assert _one(admin, "SELECT count(*) FROM pg_roles") == roles
    assert not (settings.home / "secrets" / "database_password").exists()
    # A database that cannot be reached is named without its password.
    missing = Settings(home=tmp_path / "home", data_root=tmp_path / "data",
                       database_url="postgresql+psycopg2://postgres:hunter2@127.0.0.1:5432/no_such_database_here")
    with pytest.raises(ServiceError, match=r"RECSYS_SERVICES_DB_URL=postgresql\+psycopg2://postgres:\*\*\*@.*does not exist") as err:
        _ensure_database(missing)
    assert "hunter2" not in str(err.value)


def test_settings_from_the_environment(monkeypatch):
    for name in ("RECSYS_SERVICES_DB_URL", "RECSYS_SERVICES_DB_ADMIN_URL"):
        monkeypatch.delenv(name, raising=False)
    default = Settings.from_env()
    assert (default.database_url, default.admin_database_url, default.database_name) \
        == (None, "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres", "recsys_airflow")
    monkeypatch.setenv("RECSYS_SERVICES_DB_ADMIN_URL", "postgresql+psycopg2://admin:pw@db.example:5433/postgres")
    assert Settings.from_env().admin_database_url == "postgresql+psycopg2://admin:pw@db.example:5433/postgres"


def test_make_airflow_gives_the_dag_its_own_api_user_so_runs_get_their_note(tmp_path):
    from deploy.standalone import standalone_env

    home = tmp_path / "airflow_home"
    env = standalone_env(home, port=8181)
    connection = json.loads(env["AIRFLOW_CONN_RECSYS_AIRFLOW_API"])
    stored = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())
    assert (connection["login"], connection["password"], connection["port"]) == ("recsys", stored["recsys"], 8181)
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == "admin:admin,recsys:user" and stored["admin"]
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1" and env["AIRFLOW_HOME"] == str(home)  # standalone would listen on every interface
    assert stat.S_IMODE((home / "simple_auth_manager_passwords.json.generated").stat().st_mode) == 0o600
    assert standalone_env(home, port=8181) == env  # a restart keeps the passwords


# ----------------------------------------------------------------------------- processes


@pytest.fixture
def sleeper():
    """A child ``sleep`` with a ``sleep`` of its own: ``(child, grandchild pid)``; both killed at the end."""
    child = subprocess.Popen(["sh", "-c", "sleep 60 & exec sleep 61"], start_new_session=True)
    deadline = time.monotonic() + 10
    while not (Path(f"/proc/{child.pid}/cmdline").read_bytes().startswith(b"sleep\0") and _descendants(child.pid)):
        assert time.monotonic() < deadline, "sh did not start its sleeps"
        time.sleep(0.05)
    (grandchild,) = _descendants(child.pid)
    # psutil's kill checks that the PID still names this process: once reaped, it may name another.
    grandchild_process = psutil.Process(grandchild)
    try:
        yield child, grandchild
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            grandchild_process.kill()
        child.kill()
        child.wait()


def _kernel_start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat: what a PID file of the /proc-reading version recorded."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def _write_pid_file(home: Path, name: str, text: str) -> None:
    (home / "pids").mkdir(parents=True, exist_ok=True)
    (home / "pids" / f"{name}.pid").write_text(text)


def test_a_process_tree_is_found_and_its_start_time_is_stable_until_it_is_gone(sleeper):
    child, grandchild = sleeper
    assert set(_descendants(os.getpid())) >= {child.pid, grandchild}
    started = _start_time(child.pid)
    assert started == _kernel_start_time(child.pid) and _start_time(child.pid) == started
    os.kill(grandchild, signal.SIGKILL)  # its parent, a sleep, never reaps it: a zombie counts as gone
    deadline = time.monotonic() + 10
    while _start_time(grandchild) is not None:
        assert time.monotonic() < deadline, "the killed grandchild still counts as running"
        time.sleep(0.05)
    assert _start_time(child.pid) == started
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert _start_time(child.pid) is None and _descendants(child.pid) == []


def test_a_pid_file_names_its_process_only_while_the_start_time_matches(tmp_path, sleeper):
    child, _ = sleeper
    settings = Settings(home=tmp_path / "home", data_root=tmp_path / "data")
    # As _launch writes it, and as the /proc-reading version did: "<pid> <start in clock ticks since boot>".
    _write_pid_file(settings.home, "airflow-scheduler", f"{child.pid} {_kernel_start_time(child.pid)}\n")
    assert running_pid(settings, "airflow-scheduler") == child.pid
    # The same PID with another start time: the recorded process ended and its PID went to another one.
    _write_pid_file(settings.home, "airflow-scheduler", f"{child.pid} {_kernel_start_time(child.pid) - 1}\n")
    assert running_pid(settings, "airflow-scheduler") is None
    for garbage in ("", f"{child.pid}", f"{child.pid} None", "not a pid file"):
        _write_pid_file(settings.home, "airflow-scheduler", garbage)
        assert running_pid(settings, "airflow-scheduler") is None, garbage
    _write_pid_file(settings.home, "airflow-scheduler", f"{child.pid} {_kernel_start_time(child.pid)}\n")
    child.kill()
    child.wait()
    assert running_pid(settings, "airflow-scheduler") is None


def test_stop_ends_a_service_with_its_children_but_never_a_process_with_its_reused_pid(tmp_path, sleeper):
    child, grandchild = sleeper
    settings = Settings(home=tmp_path / "home", data_root=tmp_path / "data")
    _write_pid_file(settings.home, "airflow-scheduler", f"{child.pid} {_kernel_start_time(child.pid) - 1}\n")
    assert stop(settings, grace=5) == []
    assert _start_time(child.pid) is not None and _start_time(grandchild) is not None
    _write_pid_file(settings.home, "airflow-scheduler", f"{child.pid} {_kernel_start_time(child.pid)}\n")
    assert stop(settings, grace=5) == ["airflow-scheduler"]
    assert _start_time(child.pid) is None and _start_time(grandchild) is None
    assert child.wait(timeout=5) == -signal.SIGTERM
