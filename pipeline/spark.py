"""The one Spark session factory: the feature job, the ALS baseline and the tests use it;
and :func:`spark_failure`, which reads what went wrong out of a Spark error.

pyspark is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import unquote, urlparse

# Settings every session of this project shares: UTC everywhere (window bounds and
# timestamps must not depend on the driver's time zone), no console progress bars.
COMMON_CONF = {"spark.sql.session.timeZone": "UTC", "spark.ui.showConsoleProgress": "false"}

# The classes a driver JVM loads, archived once by `make install` (spark_jobs.class_archive):
# a JVM this module starts maps them instead of loading and verifying each jar's classes again.
CLASS_ARCHIVE = Path(sys.prefix) / "spark-classes.jsa"
JAVA_OPTIONS = "spark.driver.extraJavaOptions"


def with_class_archive(conf: Mapping[str, Any], archive: Path = CLASS_ARCHIVE) -> dict[str, Any]:
    """``conf`` with the driver JVM option that maps ``archive``, when it exists.

    Put before the options ``conf`` has, so that its own ``-Xlog`` settings still apply;
    left out when ``conf`` records an archive itself.
    """
    options = str(conf.get(JAVA_OPTIONS, ""))
    if not archive.exists() or "ArchiveClassesAtExit" in options:
        return dict(conf)
    # The JVM writes its warnings (e.g. a stale archive refused) to stdout by default, where a
    # job prints its result: they go to stderr.
    mapped = f'-XX:SharedArchiveFile="{archive}" -Xlog:disable -Xlog:all=warning:stderr'
    return {**conf, JAVA_OPTIONS: f"{mapped} {options}".strip()}


def spark_session(app_name: str, master: str | None = None, shuffle_partitions: int = 8,
                  conf: Mapping[str, Any] | None = None, default_master: str = "local[*]") -> Any:
    """Get or create a session.

    Under ``spark-submit`` the master is spark-submit's unless ``master`` is given; outside
    it, ``master`` or else ``default_master`` is used. A driver JVM this call starts maps
    :data:`CLASS_ARCHIVE` when it exists (a stale one is refused by the JVM, with a warning).

    Args:
        app_name: Application name (shown by the cluster manager).
        master: Master URL that overrides everything, e.g. ``local[2]`` or ``spark://host:7077``.
        shuffle_partitions: ``spark.sql.shuffle.partitions``.
        conf: Further settings.
        default_master: The master when neither ``master`` nor spark-submit sets one.

    Returns:
        A ``pyspark.sql.SparkSession``.
    """
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    settings = {**COMMON_CONF, **(conf or {})}
    if "PYSPARK_GATEWAY_PORT" not in os.environ and SparkContext._active_spark_context is None:  # starts a JVM
        settings = with_class_archive(settings)
    builder = SparkSession.builder.appName(app_name).config("spark.sql.shuffle.partitions", str(shuffle_partitions))
    for key, value in settings.items():
        builder = builder.config(key, str(value))
    if master or "PYSPARK_GATEWAY_PORT" not in os.environ:  # not launched by spark-submit
        builder = builder.master(master or default_master)
        if (master or default_master).startswith("local"):
            # A local session's Python workers (Arrow functions) need this interpreter's
            # packages; pyspark would start "python3" from PATH. PYSPARK_PYTHON still wins.
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return builder.getOrCreate()


@dataclasses.dataclass(frozen=True)
class SparkFailure:
    """What a Spark error says went wrong, in the words a person needs.

    Attributes:
        file: The input file Spark names (a local path for ``file:`` URIs), or None.
        column: The column Spark names, or None.
        rule: Spark's messages from the outermost error to its root cause, e.g.
            ``[FAILED_READ_FILE.NO_HINT] Encountered error while reading file ... <- can not
            read class org.apache.parquet.format.PageHeader ...``.
    """

    file: str | None
    column: str | None
    rule: str


_URI = re.compile(r"\b(?:file|hdfs|s3a?|gs|abfss?|wasbs?):/[^\s,;'\"]*[^\s,;'\".]")
_COLUMN = re.compile(r"[Cc]olumn:? *\[`?([^\]`]+?)`?\]|parameter with name `([^`]+)`|column `([^`]+)`")


def spark_failure(err: BaseException) -> SparkFailure:
    """Read the file, the column and the rule out of a Spark error.

    Py4J reports a failed action as "An error occurred while calling o123.count", which
    names none of them; the Java exception and its causes do.

    Args:
        err: A ``py4j.protocol.Py4JJavaError`` or an error pyspark converted from the JVM
            (``AnalysisException`` and kin); anything else is described by its own message.

    Returns:
        The file and column Spark names, if any, and its messages.
    """
    messages: list[str] = []
    java = getattr(err, "java_exception", None)  # Py4JJavaError; converted errors carry the message themselves
    while java is not None and len(messages) < 6:
        text = java.getMessage()
        if text and text.strip():
            messages.append(text.strip().splitlines()[0])
        java = java.getCause()
    if not messages:
        messages = [next((line for line in str(err).splitlines() if line.strip()), type(err).__name__).strip()]
    text = " ".join(messages)
    uri = _URI.search(text)
    file = None
    if uri:
        parsed = urlparse(uri.group(0))
        file = unquote(parsed.path) if parsed.scheme == "file" else uri.group(0)
    column = next((g for m in _COLUMN.finditer(text) for g in m.groups() if g), None)
    unique = list(dict.fromkeys(m[:400] for m in messages))
    return SparkFailure(file=file, column=column, rule=" <- ".join(unique))
