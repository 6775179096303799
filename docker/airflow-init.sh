#!/usr/bin/env bash
# One-shot set-up of the stack, run by the airflow-init service (as root, before any other Airflow or
# Spark container starts):
#   1. the data, log and auth volumes belong to AIRFLOW_UID, the user every Airflow and Spark container
#      runs as (new named volumes are created owned by root);
#   2. the SimpleAuthManager passwords file holds, from the environment, the admin's password and that of
#      recsys, the DAG's own user (its report task sets the run's note through the REST API); readable by
#      that UID only;
#   3. `airflow db migrate` creates or upgrades the metadata database.
# Re-running it is safe: it changes ownership of the volume roots only and rewrites the passwords file.
set -euo pipefail

: "${AIRFLOW_UID:?}" "${RECSYS_DATA_ROOT:?}" "${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:?}"
: "${_AIRFLOW_WWW_USER_USERNAME:?}" "${_AIRFLOW_WWW_USER_PASSWORD:?set _AIRFLOW_WWW_USER_PASSWORD in docker/.env}"
: "${RECSYS_API_PASSWORD:?set RECSYS_API_PASSWORD in docker/.env}"

if [[ "$(id -u)" != "0" ]]; then
  echo "airflow-init must run as root (compose user: \"0:0\") to prepare the volumes" >&2
  exit 1
fi

# The artifact catalogue's layout (pipeline/catalog.py); docker-compose.yaml mounts one named volume on each.
for name in raw features soft_targets models registry reports; do
  mkdir -p "${RECSYS_DATA_ROOT}/${name}"
  chown "${AIRFLOW_UID}:0" "${RECSYS_DATA_ROOT}/${name}"
  chmod 0775 "${RECSYS_DATA_ROOT}/${name}"
done
mkdir -p /opt/airflow/logs
chown "${AIRFLOW_UID}:0" /opt/airflow/logs

passwords_file="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE}"
mkdir -p "$(dirname "${passwords_file}")"
chown "${AIRFLOW_UID}:0" "$(dirname "${passwords_file}")"
chmod 0700 "$(dirname "${passwords_file}")"
# JSON written by Python, so any character in a password is kept as is.
(
  umask 077
  python - "${passwords_file}" <<'PY'
import json
import os
import sys

# "recsys" is the DAG's user: the login of AIRFLOW_CONN_RECSYS_AIRFLOW_API in docker-compose.yaml.
admin = os.environ["_AIRFLOW_WWW_USER_USERNAME"]
if admin == "recsys":
    sys.exit("airflow-init: _AIRFLOW_WWW_USER_USERNAME must not be 'recsys', the DAG's own user")
with open(sys.argv[1], "w") as handle:
    json.dump({admin: os.environ["_AIRFLOW_WWW_USER_PASSWORD"], "recsys": os.environ["RECSYS_API_PASSWORD"]}, handle)
    handle.write("\n")
PY
)
chown "${AIRFLOW_UID}:0" "${passwords_file}"
chmod 0600 "${passwords_file}"
unset _AIRFLOW_WWW_USER_PASSWORD RECSYS_API_PASSWORD
echo "airflow-init: volumes owned by UID ${AIRFLOW_UID}; logins '${_AIRFLOW_WWW_USER_USERNAME}' and 'recsys' written to ${passwords_file}"

# The image's entrypoint waits for the database, then runs the command.
/entrypoint airflow db migrate
# Anything the migration logged as root goes back to the Airflow user.
chown -R "${AIRFLOW_UID}:0" /opt/airflow/logs
