"""The one Spark session factory: the feature job, the ALS baseline and the tests use it.

pyspark is imported inside :func:`spark_session`, so importing this module is cheap.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

# Settings every session of this project shares: UTC everywhere (window bounds and
# timestamps must not depend on the driver's time zone), no console progress bars.
COMMON_CONF = {"spark.sql.session.timeZone": "UTC", "spark.ui.showConsoleProgress": "false"}


def spark_session(app_name: str, master: str | None = None, shuffle_partitions: int = 8,
                  conf: Mapping[str, Any] | None = None, default_master: str = "local[*]") -> Any:
    """Get or create a session.

    Under ``spark-submit`` the master is spark-submit's unless ``master`` is given; outside
    it, ``master`` or else ``default_master`` is used.

    Args:
        app_name: Application name (shown by the cluster manager).
        master: Master URL that overrides everything, e.g. ``local[2]`` or ``spark://host:7077``.
        shuffle_partitions: ``spark.sql.shuffle.partitions``.
        conf: Further settings.
        default_master: The master when neither ``master`` nor spark-submit sets one.

    Returns:
        A ``pyspark.sql.SparkSession``.
    """
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name).config("spark.sql.shuffle.partitions", str(shuffle_partitions))
    for key, value in {**COMMON_CONF, **(conf or {})}.items():
        builder = builder.config(key, str(value))
    if master or "PYSPARK_GATEWAY_PORT" not in os.environ:  # not launched by spark-submit
        builder = builder.master(master or default_master)
    return builder.getOrCreate()
