#!/usr/bin/env bash
# Runs the DAG once under `airflow dags test` (a manual run now, processing the date in the
# conf, as a user would trigger it), its whole output in $AIRFLOW_HOME/demo_run.log, printing
# each finished task and the training and gate lines as they come (deploy/demo_progress.py);
# then each task's duration from the metadata DB, as a table, and as JSON in the file named
# by the optional third argument (e.g. bench/results/demo_timing.json), nowhere by default.
set -euo pipefail
ds="$1"; conf="$2"; timing_out="${3:-}"
start=$(date +%s.%N)
python -m deploy.demo_progress --log "${AIRFLOW_HOME}/demo_run.log" -- airflow dags test recsys_distillation -c "$conf" || exit 1
end=$(date +%s.%N)
python -m bench.demo_timing --ds "$ds" --wall "$(echo "$end - $start" | bc)" ${timing_out:+--out "$timing_out"}
