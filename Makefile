# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= data
DEMO_DS ?= 1998-04-22
DEMO_WINDOW_DAYS ?= 240

.PHONY: install test demo features-demo bench clean

install: $(STAMP)

# Re-installs only when a requirements file changes; pip itself is idempotent too.
$(STAMP): requirements.txt requirements-bench.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# MovieLens-100K ships inside this wheel; its own dependencies are heavy and unneeded.
	$(PY) -m pip install --quiet --no-deps recbole==1.2.1
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

# Real data end to end: ML-100K -> raw event logs -> validated features.
demo: $(STAMP)
	$(PY) -m pipeline.data.movielens --out $(DATA)/raw
	$(PY) -m spark_jobs.extract_features --raw $(DATA)/raw --out $(DATA)/features \
		--ds $(DEMO_DS) --window-days $(DEMO_WINDOW_DAYS)

bench: $(STAMP)
	$(PY) -m pip install --quiet -r requirements-bench.txt
	$(PY) bench/features.py

clean:
	rm -rf $(DATA) bench/work
