"""Shared fixtures: one local Spark session for the whole run; the slowest test files first."""

import logging

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before any test module imports TensorFlow)
import pytest

# The slowest files, roughly slowest first (the services file alone took 309 s on 2 cores on
# 2026-12-05; the DAG's end-to-end test and the crash-safety feature job follow). `make test` hands whole files to two workers in collection order
# (`--dist loadfile --no-loadscope-reorder`): started first, a long file runs beside the many
# short ones instead of alone at the end (xdist's own order, most tests first, ran the services
# file, 8 tests and the longest, 24th of 39).
SLOWEST_FIRST = ("test_services.py", "test_dag.py", "test_crash_safety.py", "test_reproducibility.py", "test_extract_features.py",
                 "test_distillation_pipeline.py", "test_services_setup.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))  # stable: a file's own order stays


@pytest.fixture(scope="session")
def spark():
    from pipeline.spark import spark_session

    session = spark_session("tests", "local[1]", shuffle_partitions=2, conf={"spark.ui.enabled": "false"})
    session.sparkContext.setLogLevel("ERROR")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    yield session
    session.stop()
