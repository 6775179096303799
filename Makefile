# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= data
DEMO_DS ?= 1998-04-22
DEMO_WINDOW_DAYS ?= 240

# A project-local Airflow: SQLite metadata DB under airflow_home/, this repo's dags/, Spark on local[2].
AIRFLOW_ENV = AIRFLOW_HOME=$(CURDIR)/airflow_home AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__CORE__PLUGINS_FOLDER=$(CURDIR)/plugins AIRFLOW__CORE__LOAD_EXAMPLES=False RECSYS_DATA_ROOT=$(CURDIR)/$(DATA) PATH=$(CURDIR)/$(VENV)/bin:$$PATH \
	AIRFLOW_CONN_RECSYS_SPARK='{"conn_type": "spark", "host": "local[2]"}'

.PHONY: install test demo airflow services services-stop services-status bench bench-scale bench-quality clean

install: $(STAMP)

# Re-installs only when a requirements file or pyproject.toml changes; pip itself is idempotent too.
$(STAMP): requirements.txt requirements-bench.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# --no-compile: Python compiles a module on its first import instead (install 70 s instead of 138 s here).
	$(PY) -m pip install --quiet --no-compile -r requirements.txt
	# The project itself, editable (its packages and console scripts: pyproject.toml), on the pins
	# above without re-resolving; built with the venv's setuptools when it has one new enough (>= 64).
	$(PY) -m pip install --quiet --no-deps \
		$$($(PY) -c 'import setuptools as s; print("--no-build-isolation" * (int(s.__version__.split(".")[0]) >= 64))' 2>/dev/null) -e .
	# MovieLens-100K ships inside this wheel; its own dependencies are heavy and unneeded.
	$(PY) -m pip install --quiet --no-deps recbole==1.2.1
	# The classes a Spark driver JVM loads, archived for faster start-ups (about a minute; see spark_jobs/class_archive.py).
	$(PY) -m spark_jobs.class_archive
	touch $@

# Two workers, one test file each at a time (a file's module fixtures, e.g. the services, stay on
# one worker): much of the suite waits on Airflow, Spark and subprocesses, so the other worker's
# tests fill the time (548 tests: 11.5 minutes instead of 15.3 on 2 cores). `-n 0` runs them in one process.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15 -n $(PYTEST_WORKERS) --dist loadfile tests

# Real data end to end: ML-100K -> raw event logs -> the whole DAG under `airflow dags test`,
# printing each task and the training as they finish. Timings as JSON only where asked:
# `make demo DEMO_TIMING=bench/results/demo_timing.json`.
DEMO_TIMING ?=
demo: $(STAMP)
	$(PY) -m pipeline.data.movielens --out $(DATA)/raw
	$(AIRFLOW_ENV) airflow db migrate > /dev/null
	# No run deadline under `airflow dags test`: Airflow 3.3.2 fails such a run at its end (see the DAG file).
	$(AIRFLOW_ENV) RECSYS_RUN_DEADLINE_MINUTES=0 bash bench/time_demo.sh $(DEMO_DS) '{"ds": "$(DEMO_DS)", "window_days": $(DEMO_WINDOW_DAYS)}' '$(DEMO_TIMING)'
	$(PY) -m pipeline.steps.summary --data-root $(DATA) --ds $(DEMO_DS) --set features.window_days=$(DEMO_WINDOW_DAYS)

# The Airflow UI with this DAG on 127.0.0.1:8080 (user admin; password in airflow_home/), run notes included.
airflow: $(STAMP)
	$(AIRFLOW_ENV) RECSYS_SCHEDULE=$${RECSYS_SCHEDULE:-none} $(PY) -m deploy.standalone --home $(CURDIR)/airflow_home

# TensorBoard on 127.0.0.1:6006 over every model's training logs, models/<role>/<version>/tensorboard/
# {selection,refit} (per-epoch loss terms, validation metrics, seconds); a training still running shows
# from its unpublished .tmp-* directory. TensorBoard itself is installed on first use (requirements-tensorboard.txt).
.PHONY: tensorboard
tensorboard: $(STAMP)
	$(PY) -m pip install --quiet -r requirements-tensorboard.txt
	$(PY) -m tensorboard.main --logdir $(DATA)/models --host 127.0.0.1

# The pipeline as services, without Docker: a Spark standalone master and two workers, and
# Airflow (api-server, scheduler with LocalExecutor, dag-processor, triggerer) on PostgreSQL.
# State, logs and PID files in services_home/; settings: RECSYS_SERVICES_* (see the README).
services: $(STAMP)
	RECSYS_DATA_ROOT=$${RECSYS_DATA_ROOT:-$(CURDIR)/$(DATA)} $(PY) -m deploy.services start

services-stop: $(STAMP)
	$(PY) -m deploy.services stop

services-status: $(STAMP)
	$(PY) -m deploy.services status

bench: $(STAMP)
	$(PY) -m pip install --quiet -r requirements-bench.txt
	$(PY) bench/features.py

# The whole pipeline on 1M / 3M / 10M synthetic events (about an hour on 2 cores).
bench-scale: $(STAMP)
	$(PY) -m pip install --quiet -r requirements-bench.txt
	$(PY) bench/scale.py

# Quality over 5 paired seeds on ML-100K and on a synthetic set of another shape, then the
# serving-cost curve of the exported teacher and student (results in bench/results/).
bench-quality: $(STAMP)
	$(PY) bench/quality.py --dataset ml100k
	$(PY) bench/quality.py --dataset synthetic
	$(PY) bench/serving_cost.py

clean:
	rm -rf $(DATA) bench/work
