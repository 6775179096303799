"""Reading one window of raw logs for the feature job: the window's event files (only those,
each checked by its footer), the item catalogue and the user profiles, with Spark errors
turned into errors that name the input, the column and the rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import logging
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa

from py4j.protocol import Py4JJavaError
from pyspark.errors.exceptions.captured import CapturedException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import from_arrow_schema, from_arrow_type

from pipeline.catalog import confine_raw_window
from pipeline.data.contract import SIDE_TABLES, RawWindowError, window_partitions
from pipeline.data.raw_files import CheckedFile, check_event_files, check_side_table
from pipeline.spark import spark_failure
from spark_jobs.event_rules import check_raw_schema, events_from_storage, keep_last_per_key

log = logging.getLogger("extract_features")  # the job's log lines, under one name


@dataclasses.dataclass(frozen=True)
class RawInputs:
    """The raw window as read, and what reading it found.

    Attributes:
        events: Contract columns of every event file of the window.
        items: Item catalogue, one row per ``item_id``.
        users: User profiles, one row per ``user_id``.
        partitions: The window's partition directories, oldest first.
        files: Every event file read, as the footer check found it.
        duplicate_ids: Side table -> rows dropped because their key was seen again.
        window_start: First day of the window.
        window_end: Last day of the window.
        events_dir: The raw root's ``events/``, which ``files`` lie under.
    """

    events: DataFrame
    items: DataFrame
    users: DataFrame
    partitions: list[Path]
    files: list[CheckedFile]
    duplicate_ids: dict[str, int]
    window_start: dt.date
    window_end: dt.date
    events_dir: Path

    @property
    def where(self) -> str:
        """The window's event files, as the job's logs and errors name them."""
        return f"{len(self.files)} event file(s) in ds={self.window_start}..ds={self.window_end} under {self.events_dir}"


@contextlib.contextmanager
def spark_stage(stage: str, inputs: str) -> Iterator[None]:
    """Turn a Spark error during ``stage`` into a :class:`RawWindowError` naming the input,
    the column and the rule (the original error stays chained).

    Args:
        stage: What the job was doing, e.g. ``"reading raw events"``.
        inputs: The inputs to name when Spark names no file.
    """
    try:
        yield
    except (Py4JJavaError, CapturedException) as err:  # raised by the JVM; a Python-side PySparkException is a bug here
        failure = spark_failure(err)
        raise RawWindowError(
            f"{stage} failed: input {failure.file or inputs}, column {failure.column or '(not named by Spark)'}: {failure.rule}"
        ) from err


def read_raw(spark: SparkSession, raw_root: Path, window_start: dt.date, window_end: dt.date,
             allowed_root: str | Path | None = None) -> RawInputs:
    """Read the window's event files (only those), the catalogue and the profiles.

    The files are the ones the pre-flight check judges (:func:`pipeline.data.raw_files.data_files`),
    each checked again by its footer here; Spark is given the file paths, not directories.

    Every directory and file read must resolve inside ``allowed_root`` (default: ``raw_root``).

    Raises:
        RawWindowError: No partition in the window, or a file, column or rule at fault.
        OutsideDataRoot: An input resolves outside ``allowed_root``.
    """
    raw_root = Path(raw_root)
    confine_raw_window(raw_root, window_start, window_end, allowed_root or raw_root)
    partitions = window_partitions(raw_root, window_start, window_end)
    files = check_event_files(partitions)
    if not files:
        raise RawWindowError(f"empty window: no event files in ds={window_start}..ds={window_end} under {raw_root / 'events'}")
    nanos = sum(_nanosecond_ts(f.columns) for f in files)
    if nanos:
        log.info("%d event file(s) store event_ts in nanoseconds: read as integers, floored to microseconds", nanos)
    where = f"{len(files)} event file(s) in {partitions[0].name}..{partitions[-1].name} under {raw_root / 'events'}"
    with spark_stage("reading raw events", where):
        events = functools.reduce(DataFrame.unionByName, [
            events_from_storage(frame, nanosecond_ts=_nanosecond_ts(columns)) for columns, frame in _read_checked(spark, files)
        ])
    side, duplicates = {}, {}
    for name in SIDE_TABLES:
        with spark_stage(f"reading the {name} table", str(raw_root / name)):
            side[name], duplicates[name] = _read_side_table(spark, raw_root, name)
    return RawInputs(check_raw_schema(events), side["items"], side["users"], partitions, files, duplicates,
                     window_start, window_end, raw_root / "events")


def _read_checked(spark: SparkSession, files: Sequence[CheckedFile]) -> list[tuple[pa.Schema, DataFrame]]:
    """Read files in groups that store the contract's columns alike, each under an explicit schema.

    One explicit schema per group, because Spark reads many files under one schema (inferred
    from one of them): a file storing a column differently would fail mid-job.
    """
    groups: dict[pa.Schema, list[str]] = {}
    for checked in files:
        groups.setdefault(checked.columns, []).append(str(checked.path))
    return [(columns, spark.read.schema(_read_schema(columns)).parquet(*paths)) for columns, paths in groups.items()]


def _nanosecond_ts(columns: pa.Schema) -> bool:
    return columns.field("event_ts").type.unit == "ns"


def _read_schema(columns: pa.Schema) -> T.StructType:
    """The Spark schema to read stored ``columns`` with; nanosecond timestamps as integers."""
    return T.StructType([
        T.StructField(f.name, T.LongType() if pa.types.is_timestamp(f.type) and f.type.unit == "ns" else from_arrow_type(f.type))
        for f in columns
    ])


def _read_side_table(spark: SparkSession, raw_root: Path, name: str) -> tuple[DataFrame, int]:
    """Side table ``name`` cast to its contract schema, one row per key (its first column).

    Returns:
        The table and how many rows were dropped as repeated keys (the last row read wins:
        :func:`spark_jobs.event_rules.keep_last_per_key`).
    """
    contract = SIDE_TABLES[name]
    schema, key = from_arrow_schema(contract), contract.names[0]
    files = check_side_table(raw_root, name)
    if not files:
        log.warning("no %s table under %s; side features will be null", name, raw_root / name)
        return spark.createDataFrame([], schema), 0
    source = [F.col("_metadata.file_name").alias("_source_file"), F.col("_metadata.row_index").alias("_source_row")]
    table = functools.reduce(DataFrame.unionByName, [
        frame.select(*[F.col(f.name).cast(f.dataType) for f in schema.fields], *source) for _, frame in _read_checked(spark, files)
    ])
    latest = keep_last_per_key(table, key)
    duplicates = sum(f.rows for f in files) - latest.count()
    if duplicates:
        log.warning("%s table: %d row(s) repeat a %s already seen; the last one read was kept", name, duplicates, key)
    return latest, duplicates
