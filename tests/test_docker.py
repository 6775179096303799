"""The Docker stack, checked without Docker.

No Docker engine runs on CI or in development, so ``docker/`` is only ever read: these tests check that
the Dockerfile, the compose file and ``.env.example`` agree with each other, with ``requirements.txt``,
with the installed Airflow and Spark provider, with the environment variables the code reads, and with
the commands and settings of the native services (``deploy/services.py``, run for real by
``tests/test_services.py``). Compose's own rules (interpolation, merge keys) are reproduced here as far
as the files use them.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yaml"
DATA_ROOT = "/opt/airflow/data"
# Named volume -> directory under the data root (the artifact catalogue's layout).
DATA_VOLUMES = {
    "data-raw": "raw",
    "data-features": "features",
    "data-soft-targets": "soft_targets",
    "data-models": "models",
    "data-registry": "registry",
    "data-reports": "reports",
}
AIRFLOW_SERVICES = ("airflow-init", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer", "airflow-worker")
SPARK_SERVICES = ("spark-master", "spark-worker")
CELERY_SERVICES = ("redis", "airflow-worker")
ONE_SHOT = "airflow-init"
# Folders of the code the scans below read (deploy/: the DAG and the plugin import deploy.airflow_api).
CODE_FOLDERS = ("dags", "pipeline", "spark_jobs", "deploy", "plugins")
SERVICES_TOOL_SETTING = "deploy/services.py's own setting (the services without Docker); compose sets its own ports and paths"
# Environment variables the code reads that no Docker deployment sets, and why.
PLATFORM_ENV = {
    "GX_ANALYTICS_ENABLED": "spark_jobs/validation.py sets its own default (off)",
    "PYSPARK_GATEWAY_PORT": "set by spark-submit for the Python driver it starts",
    "RECSYS_KILL_AT": "the crash tests' hook (pipeline.io.crash_point); never set in a deployment",
    **{name: "Airflow's own; deploy/demo_progress.py reads it to find make demo's SQLite DB"
       for name in ("AIRFLOW_HOME", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")},
    **{name: "TensorFlow's own thread setting; only read to record it with a model (pipeline.modeling.training.numeric_runtime)"
       for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")},
    **{name: SERVICES_TOOL_SETTING for name in (
        "RECSYS_SERVICES_HOME", "RECSYS_SERVICES_DB_URL", "RECSYS_SERVICES_DB_ADMIN_URL", "RECSYS_SERVICES_AIRFLOW_PORT",
        "RECSYS_SERVICES_SPARK_MASTER_PORT", "RECSYS_SERVICES_SPARK_UI_PORT", "RECSYS_SERVICES_SPARK_WORKER_UI_PORTS",
        "RECSYS_SERVICES_SPARK_WORKER_CORES", "RECSYS_SERVICES_SPARK_WORKER_MEMORY")},
}
# Settings of the native services (deploy/services.service_env) that the Docker stack leaves to the
# image or to Airflow's defaults, and why; every other AIRFLOW* and RECSYS_* setting must be the same.
NATIVE_ONLY_SETTINGS = {
    "AIRFLOW_HOME": "the image's own, /opt/airflow",
    "AIRFLOW__API__HOST": "natively 127.0.0.1; in its container the api-server listens on every interface (default) "
                          "and compose publishes its port on HOST_BIND_ADDRESS",
    "AIRFLOW__API__PORT": "Airflow's default, 8080",
    "AIRFLOW__API__BASE_URL": "the browser's address depends on AIRFLOW_UI_HOST_PORT; Airflow's default (none) serves it",
    "AIRFLOW__CORE__PARALLELISM": "natively sized for a 2-core machine; compose keeps Airflow's default",
    "AIRFLOW__LOGGING__BASE_LOG_FOLDER": "Airflow's default, /opt/airflow/logs: the airflow-logs volume",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET|TOKEN|(^|_)KEY($|_)")
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME, and $$ (a literal $).
INTERPOLATION = re.compile(r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
                           r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")


# ----------------------------------------------------------------------------- readers


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s#]+)", line)
        if match:
            pins[match[1].lower()] = match[2]
    return pins


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose env file; surrounding quotes removed."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def env_example() -> dict[str, str]:
    return read_env_file(DOCKER / ".env.example")


def secret_names() -> set[str]:
    return {name for name in env_example() if SECRET_NAME.search(name)}


def filled_env() -> dict[str, str]:
    """.env.example with every secret filled in, as an operator's docker/.env would be."""
    return {**env_example(), **{name: f"test-{name.lower()}" for name in secret_names()}}


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation of one value (recursively for lists and mappings).

    Raises:
        LookupError: A ``${NAME:?error}`` whose variable is unset or empty, as compose refuses to start.
    """
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match[0] == "$$":
            return "$"
        name = match["braced"] or match["bare"]
        op, arg, current = match["op"], match["arg"], env.get(name)
        if op in (":-", "-"):
            use_default = current is None or (op == ":-" and current == "")
            return arg if use_default else current
        if op in (":?", "?"):
            if current is None or (op == ":?" and current == ""):
                raise LookupError(f"{name}: {arg}")
            return current
        return current or ""

    return INTERPOLATION.sub(substitute, value)


def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose(env: dict[str, str] | None = None) -> dict:
    """The compose file as ``docker compose config`` would resolve it with ``env`` (default: filled_env)."""
    return interpolate(compose_raw(), filled_env() if env is None else env)


def services(env: dict[str, str] | None = None) -> dict[str, dict]:
    return compose(env)["services"]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def container_ports(service: dict) -> set[int]:
    """Container ports of ``[ip:][host:]container[/proto]`` port mappings."""
    return {int(str(port).rsplit(":", 1)[-1].split("/")[0]) for port in service.get("ports", [])}


def mounts(service: dict) -> set[str]:
    return {str(volume) for volume in service.get("volumes", [])}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs: comments dropped, continuation lines joined."""
    instructions, current = [], ""
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            keyword, _, args = current.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def dockerfile_env() -> dict[str, str]:
    env = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def _environ_key(node: ast.AST) -> ast.expr | None:
    """X of ``os.environ.get(X)``, ``os.getenv(X)``, ``os.environ.setdefault(X, ...)``, ``os.environ.pop(X)``,
    ``os.environ[X]`` or ``X in os.environ``; None for any other node."""
    def is_environ(expr: ast.expr) -> bool:
        return ast.unparse(expr) in ("os.environ", "environ")

    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
        if (is_environ(node.func.value) and node.func.attr in ("get", "setdefault", "pop")) or ast.unparse(node.func) == "os.getenv":
            return node.args[0]
    elif isinstance(node, ast.Subscript) and is_environ(node.value):
        return node.slice
    elif isinstance(node, ast.Compare) and len(node.comparators) == 1 and is_environ(node.comparators[0]) \
            and isinstance(node.ops[0], (ast.In, ast.NotIn)):
        return node.left
    return None


def env_reads(root: Path) -> dict[str, list[str]]:
    """Environment variable name -> places in ``root``'s Python source that read it.

    Finds the reads of :func:`_environ_key` where X is a string literal or a module-level string
    constant, and calls ``f("X", ...)`` of a module-level function ``f`` that reads the variable its
    parameter names (e.g. ``_env_int(name, default)``).
    """
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        constants = {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                     and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                     for target in node.targets if isinstance(target, ast.Name)}
        readers: dict[str, int] = {}  # function -> position of the parameter that names the variable
        by_parameter: set[int] = set()  # ids of the reads inside those functions
        for function in tree.body:
            if isinstance(function, ast.FunctionDef):
                parameters = [arg.arg for arg in function.args.args]
                for node in ast.walk(function):
                    key = _environ_key(node)
                    if isinstance(key, ast.Name) and key.id in parameters:
                        readers[function.name] = parameters.index(key.id)
                        by_parameter.add(id(node))

        def name_of(arg: ast.expr) -> str:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                return arg.value
            if isinstance(arg, ast.Name) and arg.id in constants:
                return constants[arg.id]
            raise AssertionError(f"{path}:{arg.lineno}: environment variable name is not a constant: {ast.unparse(arg)}")

        for node in ast.walk(tree):
            key = None if id(node) in by_parameter else _environ_key(node)
            if key is None and isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in readers:
                key = node.args[readers[node.func.id]]
            if key is not None:
                found.setdefault(name_of(key), []).append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def code_env_reads() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for folder in CODE_FOLDERS:
        for name, places in env_reads(REPO / folder).items():
            found.setdefault(name, []).extend(places)
    return found


def project_imports(folder: Path) -> set[str]:
    """This repository's top-level packages and modules that ``folder``'s Python files import."""
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {name for name in names if (REPO / name / "__init__.py").exists() or (REPO / f"{name}.py").exists()}


def native_services(tmp_path: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Commands (by service name) and environment of the services ``deploy/services.py`` starts without Docker."""
    from deploy.services import Settings, service_env, services as native

    settings = Settings(home=tmp_path / "services", data_root=tmp_path / "data",
                        database_url="postgresql+psycopg2://postgres@127.0.0.1:5432/recsys_airflow")
    return {service.name: service.command for service in native(settings)}, service_env(settings)


def without_options(command: list[str], *flags: str) -> list[str]:
    """``command`` less each of ``flags`` and the value after it."""
    kept, skip = [], False
    for arg in command:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        else:
            kept.append(arg)
    return kept


def simple_auth_users(value: str) -> dict[str, str]:
    """``user:role,...`` (SimpleAuthManager's users setting) as user -> role, as the installed Airflow reads it."""
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", value)
        return {user.username: user.role for user in SimpleAuthManager.get_users()}


def run_init_passwords_step(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, Path]:
    """airflow-init.sh's passwords-file step (its embedded Python) with ``env``; the result and the file."""
    step = re.search(r"<<'PY'\n(.*?)\nPY\n", (DOCKER / "airflow-init.sh").read_text(), re.S)[1]
    path = tmp_path / "simple_auth_manager_passwords.json"
    result = subprocess.run([sys.executable, "-", str(path)], input=step, env=env, capture_output=True, text=True)
    return result, path


# ----------------------------------------------------------------------------- the compose file


def test_compose_parses_and_names_the_stack():
    names = set(services())
    assert names == {"postgres", *AIRFLOW_SERVICES, *SPARK_SERVICES, *CELERY_SERVICES}
    for name, service in services().items():
        assert service.get("profiles", []) == (["celery"] if name in CELERY_SERVICES else []), name


def test_airflow_services_run_the_airflow_3_commands_of_the_native_services(tmp_path):
    from airflow.cli import cli_config

    options = {command.name: {flag for arg in command.args for flag in arg.flags} for command in cli_config.core_commands
               if isinstance(command, cli_config.ActionCommand)}
    native, _ = native_services(tmp_path)
    expected = {"airflow-api-server": "api-server", "airflow-scheduler": "scheduler",
                "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer"}
    for name, subcommand in expected.items():
        command = services()[name]["command"]
        assert command[:2] == ["airflow", subcommand] and subcommand in options, name
        assert set(command[2:]) <= options[subcommand], f"{name}: {command[2:]} are not all options of `airflow {subcommand}`"
        # As deploy/services.py runs it, less the address it binds natively (127.0.0.1 and a port of its own).
        assert command[1:] == without_options(native[name][1:], "--host", "--port"), name
    # The celery command comes from apache-airflow-providers-celery, not installed here.
    assert services()["airflow-worker"]["command"] == ["airflow", "celery", "worker"]


def test_no_log_server_unless_the_api_server_reads_the_logs_from_the_shared_volume():
    from airflow.configuration import retrieve_configuration_description

    # Task and trigger logs go to [logging] base_log_folder: Airflow's default, under AIRFLOW_HOME (the image's /opt/airflow).
    assert retrieve_configuration_description()["logging"]["options"]["base_log_folder"]["default"] == "{AIRFLOW_HOME}/logs"
    log_volume = "airflow-logs:/opt/airflow/logs"
    all_services = services()
    assert log_volume in mounts(all_services["airflow-api-server"])
    without_log_server = {name for name, service in all_services.items() if "--skip-serve-logs" in service.get("command", [])}
    assert without_log_server == {"airflow-scheduler", "airflow-triggerer"}
    for name in without_log_server:
        assert log_volume in mounts(all_services[name]), name
        assert not {"AIRFLOW_HOME", "AIRFLOW__LOGGING__BASE_LOG_FOLDER"} & set(environment(all_services[name])), name


def test_every_long_running_service_has_a_health_check_and_waits_for_init():
    all_services = services()
    for name, service in all_services.items():
        depends_on = service.get("depends_on", {})
        if name == ONE_SHOT:
            assert "healthcheck" not in service and service["restart"] == "no"
            continue
        assert service["healthcheck"]["test"], f"{name} has no health check"
        if name in (*AIRFLOW_SERVICES, *SPARK_SERVICES):
            assert depends_on[ONE_SHOT] == {"condition": "service_completed_successfully"}, name
        for dependency, spec in depends_on.items():
            if dependency != ONE_SHOT:
                assert spec["condition"] == "service_healthy", (name, dependency)
                assert "healthcheck" in all_services[dependency], (name, dependency)
                # A dependency in an inactive profile would make compose refuse the whole project.
                assert set(all_services[dependency].get("profiles", [])) <= set(service.get("profiles", [])), (name, dependency)


# Importing Airflow's API app warns about its test client's HTTP library; nothing here uses it.
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_health_checks_probe_what_the_installed_airflow_serves():
    from airflow.api_fastapi.core_api.routes.public import public_router
    from airflow.configuration import conf
    from airflow.jobs.dag_processor_job_runner import DagProcessorJobRunner
    from airflow.jobs.triggerer_job_runner import TriggererJobRunner

    checks = {name: " ".join(service["healthcheck"]["test"]) for name, service in services().items() if name != ONE_SHOT}
    assert "/api/v2/monitor/health" in {route.path for route in public_router.routes}
    assert "http://localhost:8080/api/v2/monitor/health" in checks["airflow-api-server"]
    port = conf.getint("scheduler", "scheduler_health_check_server_port")
    assert f"http://localhost:{port}/health" in checks["airflow-scheduler"]
    assert environment(services()["airflow-scheduler"])["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "true"
    assert f"--job-type {DagProcessorJobRunner.job_type} --local" in checks["airflow-dag-processor"]
    assert f"--job-type {TriggererJobRunner.job_type} --local" in checks["airflow-triggerer"]
    assert "pg_isready" in checks["postgres"] and "redis-cli ping" in checks["redis"]
    assert "http://localhost:8080/" in checks["spark-master"] and "http://localhost:8081/" in checks["spark-worker"]


def test_published_ports():
    all_services = services()
    assert container_ports(all_services["airflow-api-server"]) == {8080}
    assert container_ports(all_services["spark-master"]) == {7077, 8080}  # RPC and web UI
    # Scaled services cannot publish fixed ports; the others stay on the compose network.
    assert all(not container_ports(all_services[name]) for name in all_services
               if name not in ("airflow-api-server", "spark-master"))
    api = environment(all_services["airflow-scheduler"])["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]
    assert api == "http://airflow-api-server:8080/execution/"


def test_data_volumes_are_mounted_at_the_same_paths_in_airflow_and_spark():
    from pipeline.catalog import Catalog

    catalog = Catalog(Path(DATA_ROOT))
    layout = {getattr(catalog, name).name for name, value in vars(Catalog).items() if isinstance(value, property)}
    assert set(DATA_VOLUMES.values()) == layout
    assert dockerfile_env()["RECSYS_DATA_ROOT"] == DATA_ROOT
    declared = compose()["volumes"]
    wanted = {f"{volume}:{DATA_ROOT}/{directory}" for volume, directory in DATA_VOLUMES.items()}
    assert set(DATA_VOLUMES) <= set(declared)
    for name in (*AIRFLOW_SERVICES, *SPARK_SERVICES):
        data_mounts = {m for m in mounts(services()[name]) if m.split(":")[1].startswith(f"{DATA_ROOT}/")}
        assert data_mounts == wanted, name
    init_dirs = re.search(r"for name in ([a-z_ ]+); do", (DOCKER / "airflow-init.sh").read_text())[1].split()
    assert set(init_dirs) == layout


def test_the_scaled_spark_worker_service():
    worker = services()["spark-worker"]
    assert int(worker["deploy"]["replicas"]) == int(env_example()["SPARK_WORKERS"]) >= 2
    assert {"SPARK_WORKER_CORES", "SPARK_WORKER_MEMORY"} <= set(environment(worker))


def test_images_match_the_pinned_versions():
    pins = requirement_pins()
    (base,) = [args for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    airflow_version, python_version = re.fullmatch(r"apache/airflow:(\S+)-python(\d+\.\d+)", base).groups()
    assert airflow_version == pins["apache-airflow"]
    # requirements.txt: "known to resolve together on Python 3.11"
    assert python_version == re.search(r"on Python (\d+\.\d+)", (REPO / "requirements.txt").read_text())[1]
    for name in SPARK_SERVICES:
        image, tag = services()[name]["image"].split(":")
        assert (image, tag) == ("apache/spark", pins["pyspark"]) and tag == pins["pyspark-client"]
    # The demo data's wheel, installed as the Makefile does.
    recbole = re.search(r"--no-deps recbole==\S+", (REPO / "Makefile").read_text())[0]
    assert any(recbole in args for keyword, args in dockerfile_instructions() if keyword == "RUN")


# ----------------------------------------------------------------------------- settings and secrets


def test_every_environment_variable_the_code_reads_is_configured():
    reads = code_env_reads()
    # pipeline/data_root.py reads it through a module constant (DATA_ROOT_ENV): the scan resolves those too.
    assert any(place.startswith("pipeline/data_root.py:") for place in reads["RECSYS_DATA_ROOT"])
    example, image_env = env_example(), dockerfile_env()
    airflow_env = environment(services()["airflow-scheduler"])
    for name, places in reads.items():
        if name in PLATFORM_ENV:
            continue
        assert name in example or name in image_env, f"{name} (read at {places}) is in neither .env.example nor the Dockerfile"
        if name in example:  # a setting in docker/.env reaches the code only if compose passes it on
            assert name in airflow_env, f"{name} is in .env.example but not passed to the Airflow containers"
    unused = set(PLATFORM_ENV) - set(reads)
    assert not unused, f"PLATFORM_ENV lists variables the code no longer reads: {unused}"


def test_the_stack_has_the_settings_of_the_native_services(tmp_path):
    _, native_env = native_services(tmp_path)
    stack_env = {**dockerfile_env(), **environment(services()["airflow-scheduler"])}
    for name in native_env:
        if name.startswith(("AIRFLOW", "RECSYS_")) and name not in NATIVE_ONLY_SETTINGS:
            assert name in stack_env, f"{name} is set by deploy/services.py but neither by the compose file nor the image"
    stale = set(NATIVE_ONLY_SETTINGS) - set(native_env)
    assert not stale, f"NATIVE_ONLY_SETTINGS lists settings deploy/services.py no longer sets: {stale}"
    assert stack_env["AIRFLOW__CORE__EXECUTOR"] == native_env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert stack_env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == native_env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false"
    assert simple_auth_users(stack_env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]) \
        == simple_auth_users(native_env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]) == {"admin": "admin", "recsys": "user"}
    native_api = json.loads(native_env["AIRFLOW_CONN_RECSYS_AIRFLOW_API"])
    stack_api = json.loads(stack_env["AIRFLOW_CONN_RECSYS_AIRFLOW_API"])
    assert {key: stack_api[key] for key in ("conn_type", "login")} == {key: native_api[key] for key in ("conn_type", "login")}


def test_every_env_example_setting_is_used_by_the_compose_file():
    referenced = {match["braced"] or match["bare"] for match in INTERPOLATION.finditer(COMPOSE_FILE.read_text())}
    # COMPOSE_* variables are read by the compose CLI itself (e.g. COMPOSE_PROFILES).
    unused = {name for name in env_example() if name not in referenced and not name.startswith("COMPOSE_")}
    assert not unused, f".env.example settings the compose file never reads: {unused}"


def test_env_example_ships_no_secret_values():
    assert secret_names() >= {"POSTGRES_PASSWORD", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET",
                              "AIRFLOW_API_SECRET_KEY", "_AIRFLOW_WWW_USER_PASSWORD", "RECSYS_API_PASSWORD"}
    assert {name: value for name, value in env_example().items() if name in secret_names() and value} == {}


def test_compose_refuses_to_start_without_the_secrets():
    text = COMPOSE_FILE.read_text()
    for match in INTERPOLATION.finditer(text):
        name = match["braced"] or match["bare"]
        if name in secret_names():
            assert match["op"] == ":?", f"{match[0]}: a secret needs ${{{name}:?...}}, no default"
    for missing in secret_names():
        env = {**filled_env(), missing: ""}
        with pytest.raises(LookupError, match=missing):
            compose(env)


def test_no_secret_literal_in_the_compose_file():
    for name, service in compose_raw()["services"].items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key) and not key.endswith("_FILE"):  # a file's path is no secret
                assert re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]*\}", value), f"{name}: {key} must come from ${{...:?}}"
            for password in re.findall(r"://[^/:@\s]+:([^@\s]+)@", value):
                assert password.startswith("${"), f"{name}: {key} has a literal password"
            if key.startswith("AIRFLOW_CONN_") and value.lstrip().startswith("{"):  # a connection in JSON form
                password = json.loads(value).get("password")
                assert password is None or re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]*\}", password), \
                    f"{name}: {key} must take its password from ${{...:?}}"
    passwords_file = environment(services()["airflow-api-server"])["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    assert "_AIRFLOW_WWW_USER_PASSWORD" not in environment(services()["airflow-api-server"])
    assert {m.split(":")[1] for m in mounts(services()["airflow-api-server"])} >= {str(Path(passwords_file).parent)}


def test_airflow_settings_exist_in_the_installed_airflow():
    from airflow.configuration import retrieve_configuration_description

    options = {(section, option) for section, spec in retrieve_configuration_description(include_providers=True).items()
               for option in spec["options"]}
    for name, service in {**services(), "Dockerfile": {"environment": dockerfile_env()}}.items():
        for key in environment(service):
            if key.startswith("AIRFLOW__"):
                section, option = key[len("AIRFLOW__"):].lower().split("__", 1)
                if section == "celery":  # apache-airflow-providers-celery's section; not installed here
                    continue
                assert (section, option) in options, f"{name}: {key} is no Airflow setting"


# ----------------------------------------------------------------------------- the Spark connection


def load_dag_module(monkeypatch):
    """dags/recsys_distillation.py, imported with the compose defaults of the variables it reads at import."""
    monkeypatch.delenv("RECSYS_SPARK_CONN_ID", raising=False)
    spec = importlib.util.spec_from_file_location("recsys_distillation_for_docker_test", REPO / "dags" / "recsys_distillation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dag_spark_conn_id(monkeypatch) -> str:
    return load_dag_module(monkeypatch).SPARK_CONN_ID


def connection_from_env(value: str, conn_id: str, connection_class: str):
    """Deserialize an ``AIRFLOW_CONN_*`` value as Airflow does: JSON if it starts with ``{``, else a URI."""
    if connection_class == "airflow.models.Connection":
        from airflow.models import Connection

        return Connection.from_json(value, conn_id=conn_id) if value.startswith("{") else Connection(conn_id=conn_id, uri=value)
    from airflow.sdk import Connection  # what a task process gets

    return Connection.from_json(value, conn_id=conn_id) if value.startswith("{") else Connection.from_uri(value, conn_id=conn_id)


def spark_submit(monkeypatch, value: str, conn_id: str, connection_class: str):
    """The hook the DAG's SparkSubmitOperator gets from connection ``value``, and its spark-submit command."""
    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook

    connection = connection_from_env(value, conn_id, connection_class)
    monkeypatch.setattr(SparkSubmitHook, "get_connection", classmethod(lambda cls, requested: connection))
    # env_vars as the DAG passes them: the provider accepts them in client mode only.
    hook = SparkSubmitHook(conn_id=conn_id, name="recsys_extract_features",
                           env_vars={"PYSPARK_PYTHON": "/home/airflow/.local/bin/python"})
    return hook, hook._build_spark_submit_command("app.py")


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


@pytest.mark.parametrize("connection_class", ["airflow.models.Connection", "airflow.sdk.Connection"])
@pytest.mark.parametrize("settings", [".env.example", "compose defaults"])
def test_the_spark_connection_submits_to_the_cluster_master(monkeypatch, connection_class, settings):
    conn_id = dag_spark_conn_id(monkeypatch)
    assert conn_id == env_example()["RECSYS_SPARK_CONN_ID"]
    env = filled_env()
    if settings == "compose defaults":
        env = {name: value for name, value in env.items() if not name.startswith("RECSYS_") or name in secret_names()}
    airflow_env = environment(services(env)["airflow-scheduler"])
    assert airflow_env["RECSYS_SPARK_CONN_ID"] == conn_id

    hook, command = spark_submit(monkeypatch, airflow_env[f"AIRFLOW_CONN_{conn_id.upper()}"], conn_id, connection_class)

    assert option(command, "--master") == "spark://spark-master:7077"
    assert option(command, "--deploy-mode") == "client"
    assert not hook._should_track_driver_status  # client mode: spark-submit itself waits for the job
    # The master the spark-master service starts, and the one its workers join.
    script = (DOCKER / "spark-node.sh").read_text()
    assert "--host spark-master --port 7077" in script and " spark://spark-master:7077\n" in script


def test_the_json_form_of_the_connection_is_equivalent(monkeypatch):
    # docker/README.md offers it as an alternative: the host then carries the scheme.
    value = '{"conn_type": "spark", "host": "spark://spark-master", "port": 7077, "extra": {"deploy-mode": "client"}}'
    _, command = spark_submit(monkeypatch, value, "recsys_spark", "airflow.sdk.Connection")
    assert (option(command, "--master"), option(command, "--deploy-mode")) == ("spark://spark-master:7077", "client")


# ----------------------------------------------------------------------------- the run's note


def test_the_dag_sets_the_run_note_through_the_api_server_as_its_own_user(monkeypatch):
    import airflow.sdk

    import deploy.airflow_api

    dag = load_dag_module(monkeypatch)
    env = filled_env()
    value = environment(services(env)["airflow-scheduler"])[f"AIRFLOW_CONN_{dag.API_CONN_ID.upper()}"]
    monkeypatch.setattr(airflow.sdk.Connection, "get",
                        classmethod(lambda cls, conn_id: connection_from_env(value, conn_id, "airflow.sdk.Connection")))
    calls = []

    class RecordingAPI:
        def __init__(self, base_url, username, password):
            calls.append(("login", base_url, username, password))

        def set_note(self, dag_id, run_id, note):
            calls.append(("note", dag_id, run_id, note))

    monkeypatch.setattr(deploy.airflow_api, "AirflowAPI", RecordingAPI)

    dag.set_note("recsys_distillation", "manual__1", "BLESSED")

    # The api-server's container port (test_published_ports), as the user airflow-init gives a password.
    assert calls == [("login", "http://airflow-api-server:8080", "recsys", env["RECSYS_API_PASSWORD"]),
                     ("note", "recsys_distillation", "manual__1", "BLESSED")]


def test_airflow_init_writes_the_password_of_every_login(monkeypatch, tmp_path):
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    env = filled_env()
    result, path = run_init_passwords_step(tmp_path, environment(services(env)["airflow-init"]))
    assert result.returncode == 0, result.stderr
    api_server = environment(services(env)["airflow-api-server"])
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(path))
    # What the api-server reads: every configured user has the password from docker/.env.
    users = simple_auth_users(api_server["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"])
    assert SimpleAuthManager.get_passwords() == {"admin": env["_AIRFLOW_WWW_USER_PASSWORD"], "recsys": env["RECSYS_API_PASSWORD"]}
    assert set(users) == set(SimpleAuthManager.get_passwords())


def test_airflow_init_refuses_an_admin_named_like_the_dags_user(tmp_path):
    env = {**filled_env(), "_AIRFLOW_WWW_USER_USERNAME": "recsys"}
    result, path = run_init_passwords_step(tmp_path, environment(services(env)["airflow-init"]))
    assert result.returncode != 0
    assert "_AIRFLOW_WWW_USER_USERNAME must not be 'recsys'" in result.stderr
    assert not path.exists()


# ----------------------------------------------------------------------------- the image and its scripts


def test_dockerfile_sets_the_runtime_environment():
    env = dockerfile_env()
    assert env["TF_USE_LEGACY_KERAS"] == "1"
    assert "PYTHONPATH" not in env  # the project is an installed package (test below)
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/airflow/project/dags"
    assert env["AIRFLOW__CORE__PLUGINS_FOLDER"] == "/opt/airflow/project/plugins"
    assert env["JAVA_HOME"]


def test_the_image_installs_every_project_package_its_dags_and_plugins_import():
    copied = {shlex.split(args)[-1].rstrip("/") for keyword, args in dockerfile_instructions() if keyword == "COPY"}
    env = dockerfile_env()
    dags, plugins = Path(env["AIRFLOW__CORE__DAGS_FOLDER"]), Path(env["AIRFLOW__CORE__PLUGINS_FOLDER"])
    project = dags.parent
    # The project is installed from its copy (pyproject.toml names the packages), before the DAGs need it.
    assert f"{project}/pyproject.toml" in copied
    runs = [args for keyword, args in dockerfile_instructions() if keyword == "RUN"]
    assert any(re.search(rf"pip install [^&]*--no-deps {re.escape(str(project))}(\s|$)", run) for run in runs)
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    folders = {dags.relative_to(project).as_posix(), plugins.relative_to(project).as_posix()}
    # spark_jobs: the DAG submits the installed feature job's file (FEATURE_JOB), without importing it.
    todo, seen = sorted(folders) + ["spark_jobs"], set(folders) | {"spark_jobs"}
    while todo:
        name = todo.pop()
        assert f"{project}/{name}" in copied, f"{name}/ is loaded or imported in the image but not copied into it"
        if name not in folders:
            assert any(fnmatch.fnmatch(name, pattern) for pattern in packages), f"{name} is imported but not installed"
        for imported in project_imports(REPO / name) - seen:
            seen.add(imported)
            todo.append(imported)
    assert {"dags", "plugins", "pipeline", "deploy", "spark_jobs"} <= seen


def test_dockerfile_runs_as_a_non_root_user_with_no_secrets():
    instructions = dockerfile_instructions()
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users[-1] not in ("root", "0", "0:0")
    for keyword, args in instructions:
        if keyword in ("ENV", "ARG"):
            for item in shlex.split(args):
                assert not SECRET_NAME.search(item.split("=", 1)[0]), f"{keyword} {item} looks like a secret"


def test_dockerfile_installs_the_pins_without_airflow_constraints():
    runs = [args for keyword, args in dockerfile_instructions() if keyword == "RUN"]
    (install,) = [run for run in runs if "-r /opt/airflow/project/requirements.txt" in run]
    assert "--constraint" not in install and " -c " not in install
    args = [args for keyword, args in dockerfile_instructions() if keyword == "ARG"]
    assert "JAVA_PACKAGE=openjdk-17-jre-headless" in args  # Java 17, as in the apache/spark image


def test_build_context_sends_what_the_dockerfile_copies():
    build = compose_raw()["x-airflow-common"]["build"]
    assert (DOCKER / build["context"]).resolve() == REPO and (REPO / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    ignore = [line for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*"  # everything out, then exceptions back in
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY":
            *sources, _ = [arg for arg in shlex.split(args) if not arg.startswith("--")]
            for source in sources:
                assert (REPO / source).exists(), source
                assert f"!{source}" in ignore, f"{source} is copied but excluded by Dockerfile.dockerignore"


def test_scripts_the_stack_runs():
    init = services()["airflow-init"]
    assert init["entrypoint"][-1] == "/opt/airflow/project/docker/airflow-init.sh"
    assert any(args.endswith("docker/airflow-init.sh /opt/airflow/project/docker/airflow-init.sh")
               for keyword, args in dockerfile_instructions() if keyword == "COPY")
    assert init["user"] == "0:0" and {"_AIRFLOW_WWW_USER_PASSWORD", "RECSYS_API_PASSWORD"} <= set(environment(init))
    for name in SPARK_SERVICES:
        assert "./spark-node.sh:/opt/recsys/spark-node.sh:ro" in mounts(services()[name])
    script = (DOCKER / "spark-node.sh").read_text()
    assert "/opt/spark/bin/spark-class org.apache.spark.deploy.master.Master" in script
    assert "/opt/spark/bin/spark-class org.apache.spark.deploy.worker.Worker" in script
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash to syntax-check the scripts")
    for script_path in (DOCKER / "airflow-init.sh", DOCKER / "spark-node.sh"):
        result = subprocess.run([bash, "-n", str(script_path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_interpolation_follows_compose_rules():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $$HOME $SET", env) == "x d  d $HOME x"
    with pytest.raises(LookupError, match="EMPTY: needed"):
        interpolate("${EMPTY:?needed}", env)
    assert interpolate("${EMPTY?needed}", env) == ""
