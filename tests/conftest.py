"""Shared fixtures: one local Spark session for the whole run."""

import logging

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before any test module imports TensorFlow)
import pytest

@pytest.fixture(scope="session")
def spark():
    from pipeline.spark import spark_session

    session = spark_session("tests", "local[1]", shuffle_partitions=2, conf={"spark.ui.enabled": "false"})
    session.sparkContext.setLogLevel("ERROR")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    yield session
    session.stop()
