#!/usr/bin/env bash
# Runs the DAG once under `airflow dags test` (a manual run now, processing the date in the
# conf, as a user would trigger it) and writes its wall time and each task's duration to
# bench/results/demo_timing.json (read back from the metadata DB).
set -euo pipefail
ds="$1"; conf="$2"
start=$(date +%s.%N)
airflow dags test recsys_distillation -c "$conf" > "${AIRFLOW_HOME}/demo_run.log" 2>&1 || { tail -50 "${AIRFLOW_HOME}/demo_run.log"; exit 1; }
end=$(date +%s.%N)
python -m bench.demo_timing --ds "$ds" --wall "$(echo "$end - $start" | bc)"
