"""The pipeline as services on one machine, without Docker.

A Spark standalone master and its workers, and Airflow's api-server, scheduler (LocalExecutor:
each task in a process of its own), dag-processor and triggerer on a PostgreSQL database,
created when missing. Every process is started in a session of its own, with its log and PID
file under one folder (``services_home/`` by default); ``stop`` ends exactly those processes
and their children. Both commands are idempotent.

    python -m deploy.services start | stop | status

Every setting comes from the environment (see :class:`Settings`); every port is bound to
127.0.0.1. The commands, settings and order are the same as ``docker/docker-compose.yaml``'s.

Secrets (the UI passwords, Airflow's JWT and session keys, the Spark cluster's shared secret,
the database role's password) are generated once and kept in files of mode 600 in folders of
mode 700; none is ever put on a command line. The Spark master and workers run with
``spark.authenticate``: only a driver that has the secret (every process with :func:`service_env`'s
``SPARK_CONF_DIR``, e.g. the DAG's spark-submit) gets executors. Airflow connects to its database
as a role of its own, not as the superuser that created it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import psutil

from pipeline.io import write_text

log = logging.getLogger("deploy.services")

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
DAG_ID = "recsys_distillation"
# The superuser that creates the services' own database and role (PostgreSQL's default: local, no password).
ADMIN_DATABASE_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


class ServiceError(RuntimeError):
    """A service could not be started or stopped; the message says which and why."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ServiceError(f"{name}={raw!r} must be a port number") from None


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where the services live and listen.

    Attributes:
        home: Folder of the services' state: ``airflow/`` (AIRFLOW_HOME), ``secrets/``, ``spark/`` (``conf/``
            is SPARK_CONF_DIR), ``logs/``, ``pids/``.
        data_root: The pipeline's data root (``RECSYS_DATA_ROOT`` of every task).
        database_url: The operator's own metadata database (PostgreSQL), used as is. None (the default):
            the services' own database ``database_name``, which ``start`` creates when missing through
            ``admin_database_url``, owned by a role of the same name (its password generated into
            ``secrets/``) as which Airflow connects.
        admin_database_url: A PostgreSQL role that may create roles and databases; used for nothing else.
        database_name: The services' own database and the role that owns it.
        airflow_port: Airflow api-server (UI, REST API and the tasks' Execution API).
        spark_master_port: Spark master RPC port.
        spark_ui_port: Spark master web UI (and its JSON API at ``/json/``).
        spark_worker_ui_ports: One web UI port per worker; their count is the number of workers.
        spark_worker_cores: Cores each worker offers.
        spark_worker_memory: Memory each worker offers, e.g. ``2g``.
        schedule: ``RECSYS_SCHEDULE`` of the DAG (cron, or ``none`` for manual runs only).
    """

    home: Path
    data_root: Path
    database_url: str | None = None
    admin_database_url: str = ADMIN_DATABASE_URL
    database_name: str = "recsys_airflow"
    airflow_port: int = 8080
    spark_master_port: int = 7077
    spark_ui_port: int = 8090
    spark_worker_ui_ports: tuple[int, ...] = (8091, 8092)
    spark_worker_cores: int = 1
    spark_worker_memory: str = "2g"
    schedule: str = "0 2 * * *"

    @classmethod
    def from_env(cls) -> Settings:
        """Settings from ``RECSYS_SERVICES_*`` variables (defaults: this repository's folders, PostgreSQL at 127.0.0.1:5432).

        ``RECSYS_SERVICES_DB_URL`` names the operator's own database; ``RECSYS_SERVICES_DB_ADMIN_URL``
        the role that creates the services' own one when it is not set.
        """
        workers = os.environ.get("RECSYS_SERVICES_SPARK_WORKER_UI_PORTS", "8091,8092")
        try:
            worker_ports = tuple(int(port) for port in workers.split(","))
        except ValueError:
            raise ServiceError(f"RECSYS_SERVICES_SPARK_WORKER_UI_PORTS={workers!r} must be comma-separated port numbers") from None
        return cls(
            home=Path(os.environ.get("RECSYS_SERVICES_HOME") or REPO / "services_home").resolve(),
            data_root=Path(os.environ.get("RECSYS_DATA_ROOT") or REPO / "data").resolve(),
            database_url=os.environ.get("RECSYS_SERVICES_DB_URL") or None,
            admin_database_url=os.environ.get("RECSYS_SERVICES_DB_ADMIN_URL") or ADMIN_DATABASE_URL,
            airflow_port=_env_int("RECSYS_SERVICES_AIRFLOW_PORT", 8080),
            spark_master_port=_env_int("RECSYS_SERVICES_SPARK_MASTER_PORT", 7077),
            spark_ui_port=_env_int("RECSYS_SERVICES_SPARK_UI_PORT", 8090),
            spark_worker_ui_ports=worker_ports,
            spark_worker_cores=_env_int("RECSYS_SERVICES_SPARK_WORKER_CORES", 1),
            spark_worker_memory=os.environ.get("RECSYS_SERVICES_SPARK_WORKER_MEMORY", "2g"),
            schedule=os.environ.get("RECSYS_SCHEDULE", "0 2 * * *"),
        )

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def secrets_dir(self) -> Path:
        return self.home / "secrets"

    @property
    def spark_conf_dir(self) -> Path:
        """SPARK_CONF_DIR of every service: its ``spark-defaults.conf`` holds the cluster's secret."""
        return self.home / "spark" / "conf"

    @property
    def airflow_url(self) -> str:
        return f"http://{HOST}:{self.airflow_port}"

    @property
    def spark_master_url(self) -> str:
        return f"spark://{HOST}:{self.spark_master_port}"

    @property
    def spark_ui_url(self) -> str:
        return f"http://{HOST}:{self.spark_ui_port}"

    @property
    def ports(self) -> dict[str, int]:
        """Every port a service listens on, by service name."""
        ports = {"spark-master": self.spark_master_port, "spark-master-ui": self.spark_ui_port, "airflow-api-server": self.airflow_port}
        ports.update({f"spark-worker-{i + 1}-ui": port for i, port in enumerate(self.spark_worker_ui_ports)})
        return ports


@dataclasses.dataclass(frozen=True)
class Service:
    """One long-running process: its name, command and the port that says it is up (if any)."""

    name: str
    command: list[str]
    port: int | None = None


USERS = {"admin": "admin", "recsys": "user"}  # user -> role; "recsys" is the DAG's own (it writes run notes)


PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"  # the simple auth manager's, in AIRFLOW_HOME


def passwords_file(settings: Settings) -> Path:
    return settings.airflow_home / PASSWORDS_FILE


def users_setting() -> str:
    """``[core] simple_auth_manager_users`` for :data:`USERS`."""
    return ",".join(f"{user}:{role}" for user, role in USERS.items())


def api_connection(port: int, recsys_password: str) -> str:
    """``AIRFLOW_CONN_RECSYS_AIRFLOW_API``: the DAG's own user on the api-server (it writes run notes)."""
    return json.dumps({"conn_type": "http", "host": HOST, "port": port, "login": "recsys", "password": recsys_password})


# ---------------------------------------------------------------------------- secrets
#
# Every secret is read from its file by whoever needs it. One that is missing, empty, unreadable
# or unparsable (e.g. left so by a process killed while writing it) is generated again, by one
# process at a time under a lock, and written atomically: a reader sees the old file or the whole
# new one, so every service and command of a start gets the same value.

SPARK_SECRET = "spark_auth_secret"
DATABASE_PASSWORD = "database_password"


def _private_dir(folder: Path) -> Path:
    """``folder``, created if missing, with mode 700 (also when an earlier version made it with the default mode)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)
    return folder


def _secrets_lock(settings: Settings) -> contextlib.AbstractContextManager:
    """Hold the lock under which the services' secrets are generated (see :func:`_lock_in`)."""
    return _lock_in(settings.secrets_dir)


@contextlib.contextmanager
def _lock_in(folder: Path) -> Iterator[None]:
    """Hold the lock under which secrets in ``folder`` are generated: one process writes, the
    others then read its file. The kernel drops a ``flock`` when its holder dies, so a killed
    writer never leaves it held."""
    fd = os.open(_private_dir(folder) / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_private(path: Path, text: str) -> None:
    """Put ``text`` at ``path`` atomically, readable by this user only from the file's creation on.

    :func:`pipeline.io.write_text` with mode 600: a writer killed midway leaves only its
    temporary file, which the next write sweeps. Callers hold :func:`_secrets_lock`.
    """
    _private_dir(path.parent)
    write_text(path, text, mode=0o600)


def _read_text(path: Path) -> str | None:
    """The file's text, or None if it is missing or unreadable."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _secret(settings: Settings, name: str) -> str:
    """A random secret kept in ``secrets/<name>``, so every process and restart shares it."""
    path = settings.secrets_dir / name
    value = (_read_text(path) or "").strip()
    if not value:
        with _secrets_lock(settings):
            value = (_read_text(path) or "").strip()  # another process may have written it meanwhile
            if not value:
                if path.exists():
                    log.warning("secret %s is empty or unreadable: a new one is generated "
                                "(restart the services that still run with the old one)", path)
                value = secrets.token_urlsafe(32)
                _write_private(path, value)
    return value


def _passwords(path: Path) -> dict[str, str]:
    """The valid entries of a passwords file (none if it is missing, unreadable or not a JSON object)."""
    try:
        known = json.loads(_read_text(path) or "{}")
    except ValueError:
        return {}
    if not isinstance(known, dict):
        return {}
    return {user: value for user, value in known.items() if isinstance(value, str) and value.strip()}


def password(settings: Settings, user: str = "admin") -> str:
    """A user's password for the UI and the REST API (generated once, kept in the passwords file).

    Written before the api-server starts, so the DAG's own user has a password we know.
    """
    return user_passwords(passwords_file(settings), settings.secrets_dir)[user]


def user_passwords(path: Path, lock_dir: Path) -> dict[str, str]:
    """Every :data:`USERS` password in the auth manager's passwords file ``path``, the missing
    ones generated (under the lock in ``lock_dir``) and written with mode 600."""
    known = _passwords(path)
    if any(name not in known for name in USERS):
        with _lock_in(lock_dir):
            known = _passwords(path)
            missing = [name for name in USERS if name not in known]
            if missing:
                known = {**known, **{name: secrets.token_urlsafe(16) for name in missing}}
                _write_private(path, json.dumps(known))
    return known


def _spark_conf_dir(settings: Settings) -> Path:
    """SPARK_CONF_DIR of the services, with the cluster's authentication in its ``spark-defaults.conf``.

    The master and workers, spark-submit and pyspark all read that file, so the secret is
    never on a command line. A driver without it cannot register with the master. The master's
    REST submission server, which ignores ``spark.authenticate``, is turned off.
    """
    path = settings.spark_conf_dir / "spark-defaults.conf"
    wanted = ("# Written by deploy/services.py at every start (the secret: secrets/spark_auth_secret).\n"
              "spark.authenticate true\n"
              f"spark.authenticate.secret {_secret(settings, SPARK_SECRET)}\n"
              "spark.master.rest.enabled false\n")
    if _read_text(path) != wanted:
        with _secrets_lock(settings):
            if _read_text(path) != wanted:
                _write_private(path, wanted)
    return _private_dir(settings.spark_conf_dir)


def airflow_database_url(settings: Settings) -> str:
    """The URL Airflow connects with: ``database_url`` as given, else the services' own database as its own role."""
    from sqlalchemy.engine import make_url

    if settings.database_url:
        return settings.database_url
    own = make_url(settings.admin_database_url).set(username=settings.database_name, database=settings.database_name,
                                                   password=_secret(settings, DATABASE_PASSWORD))
    return own.render_as_string(hide_password=False)


def spark_home() -> Path:
    """The ``pyspark`` wheel's folder: it ships ``bin/spark-class`` and the jars."""
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def service_env(settings: Settings) -> dict[str, str]:
    """The environment of every service (and of ``airflow`` commands run against them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    for folder in (settings.secrets_dir, settings.airflow_home):
        _private_dir(folder)
    bin_dir = str(Path(sys.executable).parent)
    env.update({
        "PATH": f"{bin_dir}:{env.get('PATH', '')}",
        "RECSYS_DATA_ROOT": str(settings.data_root),
        "RECSYS_ALLOWED_SPARK_MASTERS": settings.spark_master_url,  # a trigger may name this cluster, or local
        "RECSYS_SCHEDULE": settings.schedule,
        # Spark: the wheel's own distribution; every daemon, driver and executor bound to 127.0.0.1.
        "SPARK_HOME": str(spark_home()),
        "SPARK_LOCAL_IP": HOST,
        # spark-defaults.conf with the cluster's secret, read by every daemon, spark-submit and pyspark.
        "SPARK_CONF_DIR": str(_spark_conf_dir(settings)),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        # Airflow: LocalExecutor on PostgreSQL, this repository's DAGs, no examples.
        "AIRFLOW_HOME": str(settings.airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_database_url(settings),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{settings.airflow_url}/execution/",
        "AIRFLOW__API__HOST": HOST,
        "AIRFLOW__API__PORT": str(settings.airflow_port),
        "AIRFLOW__API__BASE_URL": settings.airflow_url,
        "AIRFLOW__API__SECRET_KEY": _secret(settings, "api_secret_key"),
        "AIRFLOW__API_AUTH__JWT_SECRET": _secret(settings, "jwt_secret"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": users_setting(),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(settings.home / "logs" / "tasks"),
        "AIRFLOW_CONN_RECSYS_SPARK": json.dumps({"conn_type": "spark", "host": f"spark://{HOST}", "port": settings.spark_master_port,
                                                 "extra": {"deploy-mode": "client"}}),
        "AIRFLOW_CONN_RECSYS_AIRFLOW_API": api_connection(settings.airflow_port, password(settings, "recsys")),
    })
    return env


def services(settings: Settings) -> list[Service]:
    """Every service, in start order."""
    spark_class = str(spark_home() / "bin" / "spark-class")
    airflow = str(Path(sys.executable).parent / "airflow")
    listed = [Service("spark-master", [spark_class, "org.apache.spark.deploy.master.Master", "--host", HOST,
                                       "--port", str(settings.spark_master_port), "--webui-port", str(settings.spark_ui_port)],
                      settings.spark_ui_port)]
    for i, ui_port in enumerate(settings.spark_worker_ui_ports):
        listed.append(Service(f"spark-worker-{i + 1}", [
            spark_class, "org.apache.spark.deploy.worker.Worker", settings.spark_master_url, "--host", HOST,
            "--webui-port", str(ui_port), "--cores", str(settings.spark_worker_cores), "--memory", settings.spark_worker_memory,
            "--work-dir", str(settings.home / "spark" / f"worker-{i + 1}")], ui_port))
    listed.append(Service("airflow-api-server", [airflow, "api-server", "--host", HOST, "--port", str(settings.airflow_port)],
                          settings.airflow_port))
    # No log servers (they bind every interface): the api-server reads task logs from the shared log folder.
    listed += [Service("airflow-scheduler", [airflow, "scheduler", "--skip-serve-logs"]),
               Service("airflow-dag-processor", [airflow, "dag-processor"]),
               Service("airflow-triggerer", [airflow, "triggerer", "--skip-serve-logs"])]
    return listed


# ---------------------------------------------------------------------------- processes


# The unit of the kernel's record of when a process started (field 22 of /proc/<pid>/stat).
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _start_time(pid: int) -> int | None:
    """When a process started, in clock ticks since boot (the kernel's record, as in PID files), or
    None if it is gone (a zombie, whose parent has not reaped it yet, is gone too).

    Since boot, not psutil's seconds since the epoch: those add the boot time, which moves when the
    wall clock is set (NTP, a resume), and a PID file must still match its process days later.
    """
    try:
        process = psutil.Process(pid)
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        return round((process.create_time() - psutil.boot_time()) * CLOCK_TICKS)
    except psutil.NoSuchProcess:  # psutil.ZombieProcess is one
        return None


def _command(pid: int) -> str:
    """The process's command line (its first 200 characters), for messages."""
    try:
        return " ".join(psutil.Process(pid).cmdline())[:200]
    except psutil.NoSuchProcess:
        return "(gone)"
    except psutil.AccessDenied:
        return "(not readable)"


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.home / "pids" / f"{name}.pid"


def running_pid(settings: Settings, name: str) -> int | None:
    """The PID of a service this tool started and that still runs (the same process, not a reused PID)."""
    try:
        pid, started = (int(field) for field in _pid_file(settings, name).read_text().split())
    except (OSError, ValueError):
        return None
    return pid if _start_time(pid) == started else None


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (none if it is gone)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _launch(settings: Settings, service: Service, env: dict[str, str]) -> int:
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{service.name}.log", "ab") as out:
        process = subprocess.Popen(service.command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    pid_file = _pid_file(settings, service.name)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    write_text(pid_file, f"{process.pid} {_start_time(process.pid)}\n")
    log.info("started %s (pid %d, log %s)", service.name, process.pid, logs / f"{service.name}.log")
    return process.pid


def _wait_for(what: str, check, timeout: float, log_file: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    tail = ""
    if log_file and log_file.exists():
        tail = "\n" + "\n".join(log_file.read_text(errors="replace").splitlines()[-20:])
    raise ServiceError(f"{what} not ready after {timeout:.0f} s{tail}")


def _http_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except (OSError, ValueError, urllib.error.URLError):
        return None


def _connect(url: str, setting: str):
    """A psycopg2 connection to ``url``'s database; ``setting`` names the URL in errors (without its password)."""
    from sqlalchemy.engine import make_url

    import psycopg2

    parsed = make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    if not parsed.drivername.startswith("postgresql"):
        raise ServiceError(f"{setting}={shown}: the services need PostgreSQL (LocalExecutor runs tasks in parallel)")
    try:
        return psycopg2.connect(host=parsed.host or HOST, port=parsed.port or 5432, user=parsed.username or "postgres",
                                password=parsed.password, dbname=parsed.database or "postgres", connect_timeout=5)
    except psycopg2.OperationalError as err:
        raise ServiceError(f"{setting}={shown}: cannot connect: {str(err).strip()}") from err


def _ensure_database(settings: Settings) -> None:
    """Check the operator's database, or create the services' own one and its role when missing.

    The role (``database_name``, password ``secrets/database_password``) may log in and nothing
    more: no superuser, no new databases or roles; it owns its database, where ``airflow db migrate``
    creates Airflow's tables. Its password is set at every start, so a new services home still
    connects; the server stores only its hash (computed here), never the password.

    Raises:
        ServiceError: PostgreSQL is unreachable, or the database exists owned by another role.
    """
    from psycopg2 import sql
    from psycopg2.extensions import encrypt_password

    if settings.database_url:  # the operator's, used as is
        _connect(settings.database_url, "RECSYS_SERVICES_DB_URL").close()
        return
    role = name = settings.database_name
    conn = _connect(settings.admin_database_url, "RECSYS_SERVICES_DB_ADMIN_URL")
    conn.autocommit = True
    try:
        verifier = encrypt_password(_secret(settings, DATABASE_PASSWORD), role, conn)
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            exists = cur.fetchone() is not None
            statement = ("ALTER" if exists else "CREATE") + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %s"
            cur.execute(sql.SQL(statement).format(sql.Identifier(role)), (verifier,))
            if not exists:
                log.info("created role %s", role)
            cur.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (name,))
            owner = cur.fetchone()
            if owner is None:
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(role)))
                log.info("created database %s, owned by %s", name, role)
            elif owner[0] != role:
                raise ServiceError(f"database {name} exists but is owned by {owner[0]}, not by the services' role {role} "
                                   f"(made by an earlier version?): drop it to let it be made again, or set "
                                   f"RECSYS_SERVICES_DB_URL to use it as is")
    finally:
        conn.close()


def start(settings: Settings, timeout: float = 180) -> None:
    """Start every service not already running, then wait until all are up.

    Raises:
        ServiceError: A port is taken by another process, PostgreSQL is unreachable, the
            services' database exists owned by another role, or a service is not up within
            ``timeout`` seconds (its log's tail is in the message).
    """
    todo = [s for s in services(settings) if running_pid(settings, s.name) is None]
    busy = [f"{s.name} port {s.port}" for s in todo if s.port is not None and _port_open(s.port)]
    if busy:
        raise ServiceError(f"ports already in use by another process: {', '.join(busy)} (set RECSYS_SERVICES_*_PORT)")
    if not todo:
        log.info("every service already runs")
        return
    for folder in ("logs", "pids", "spark"):  # airflow/ and secrets/: service_env makes them, private
        (settings.home / folder).mkdir(parents=True, exist_ok=True)
    settings.data_root.mkdir(parents=True, exist_ok=True)
    env = service_env(settings)
    if any(s.name.startswith("airflow") for s in todo):
        _ensure_database(settings)
        migrated = subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env=env, cwd=REPO,
                                  capture_output=True, text=True)
        if migrated.returncode != 0:
            raise ServiceError(f"airflow db migrate failed:\n{migrated.stderr[-3000:]}")
    try:
        _start(settings, todo, env, timeout)
    except BaseException:
        stop(settings)  # a failed start leaves nothing running
        raise
    log.info("services up: Airflow %s (user admin, password in %s), Spark master %s (UI %s)", settings.airflow_url,
             passwords_file(settings), settings.spark_master_url, settings.spark_ui_url)


def _start(settings: Settings, todo: list[Service], env: dict[str, str], timeout: float) -> None:
    logs = settings.home / "logs"
    for service in todo:
        _launch(settings, service, env)
        if service.name == "spark-master":  # workers register with a master that is up
            _wait_for("spark-master", lambda: _port_open(settings.spark_master_port), timeout, logs / "spark-master.log")
    for service in todo:
        if service.port is not None:
            _wait_for(service.name, lambda port=service.port: _port_open(port), timeout, logs / f"{service.name}.log")
    workers = len(settings.spark_worker_ui_ports)
    _wait_for(f"{workers} Spark workers registered", lambda: len([w for w in (_http_json(f"{settings.spark_ui_url}/json/") or {})
                                                                  .get("workers", []) if w.get("state") == "ALIVE"]) >= workers,
              timeout, logs / "spark-master.log")
    _wait_for("Airflow scheduler, dag-processor and triggerer healthy", lambda: _healthy(settings), timeout,
              logs / "airflow-scheduler.log")


def _healthy(settings: Settings) -> bool:
    health = _http_json(f"{settings.airflow_url}/api/v2/monitor/health") or {}
    parts = ("metadatabase", "scheduler", "dag_processor", "triggerer")
    return all((health.get(part) or {}).get("status") == "healthy" for part in parts)


def stop(settings: Settings, grace: float = 30) -> list[str]:
    """Stop every service this tool started, with every process below it; idempotent.

    SIGTERM first (Airflow and Spark shut down cleanly), SIGKILL after ``grace`` seconds.

    Returns:
        The names of the services that were running.
    """
    stopped, targets = [], []
    for service in reversed(services(settings)):
        pid = running_pid(settings, service.name)
        if pid is not None:
            stopped.append(service.name)
            targets += [pid, *_descendants(pid)]
    # Every process below a service (task runners, spark-submit's driver, executors), not just its group.
    alive = {pid: started for pid in targets if (started := _start_time(pid)) is not None}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, started in alive.items():
            if _start_time(pid) == started:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_start_time(pid) == started for pid, started in alive.items()):
            time.sleep(0.5)
        alive = {pid: started for pid, started in alive.items() if _start_time(pid) == started}
        if not alive:
            break
    for service in services(settings):
        _pid_file(settings, service.name).unlink(missing_ok=True)
    if alive:
        raise ServiceError("processes still running after SIGKILL: " + "; ".join(f"{pid} {_command(pid)}" for pid in sorted(alive)))
    log.info("stopped %s", ", ".join(stopped) if stopped else "nothing (no service was running)")
    return stopped


def status(settings: Settings) -> dict[str, int | None]:
    """PID of every service (None: not running)."""
    return {service.name: running_pid(settings, service.name) for service in services(settings)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    try:
        if args.command == "start":
            if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
                raise ServiceError("Spark needs Java 17: neither `java` on PATH nor JAVA_HOME")
            start(settings)
        elif args.command == "stop":
            stop(settings)
        else:
            for name, pid in status(settings).items():
                print(f"{name:24} {'running, pid ' + str(pid) if pid else 'stopped'}")
    except ServiceError as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
