"""``make airflow``: ``airflow standalone`` with this DAG, as a person uses it to try the UI.

Before it starts: the UI and REST API listen on 127.0.0.1 only, the users are ``admin`` and
the DAG's own ``recsys`` (role user), their passwords generated into the auth manager's
passwords file in ``$AIRFLOW_HOME`` (mode 600), and the connection ``recsys_airflow_api``
holds the ``recsys`` user, so the ``report`` task writes the run's note (decision, metrics,
report link) as it does under ``make services``.

    AIRFLOW_HOME=DIR python -m deploy.standalone --home DIR [--port 8080]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from deploy.services import HOST, PASSWORDS_FILE, api_connection, user_passwords, users_setting

def standalone_env(airflow_home: Path, port: int = 8080) -> dict[str, str]:
    """The settings ``airflow standalone`` starts with (on top of the caller's environment)."""
    passwords = user_passwords(airflow_home / PASSWORDS_FILE, airflow_home / "secrets")
    return {"AIRFLOW_HOME": str(airflow_home), "AIRFLOW__API__HOST": HOST, "AIRFLOW__API__PORT": str(port), "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": users_setting(),
            "AIRFLOW_CONN_RECSYS_AIRFLOW_API": api_connection(port, passwords["recsys"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="airflow standalone with this DAG, on 127.0.0.1, with run notes")
    parser.add_argument("--home", type=Path, required=True, help="AIRFLOW_HOME")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    home = args.home.resolve()
    env = {**os.environ, **standalone_env(home, args.port)}
    print(f"Airflow at http://{HOST}:{args.port} (user admin, password in {home / PASSWORDS_FILE})", flush=True)
    airflow = str(Path(sys.executable).parent / "airflow")
    os.execve(airflow, [airflow, "standalone"], env)


if __name__ == "__main__":
    main()
