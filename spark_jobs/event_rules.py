"""The raw event rules of the feature job: the contract's columns and types, exact duplicates,
the quarantine rules, and the side tables' repeated keys.

Pure DataFrame functions like :mod:`spark_jobs.feature_transforms`: none reads or writes
files. The rules a raw row must follow come from :mod:`pipeline.data.contract`.
"""

from __future__ import annotations

import datetime as dt

import pyarrow as pa

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_type

from pipeline.data.contract import BLANK_ID_FLAGS, EVENT_ID_COPIES, EVENT_SCHEMA, EVENT_TYPES, ID_COLUMNS, MIN_VALUE, WHITESPACE, RawWindowError, window_bounds
from pipeline.data.raw_files import schema_problems

RAW_COLUMNS = tuple(EVENT_SCHEMA.names)
BROADCAST_CONFLICTS_MAX = 1_000_000  # conflicting event_ids (or repeated id hashes) sent to every task at most (a few tens of MB)
ID_HASH, REPEATED_ID = "_id_hash", "_repeated_id"


def events_from_storage(events: DataFrame, nanosecond_ts: bool) -> DataFrame:
    """Events read from files that store ``event_ts`` one way, with ``event_ts`` as a timestamp.

    Args:
        events: The contract's columns as read (an all-null column may be of null type).
        nanosecond_ts: ``event_ts`` was read as integer nanoseconds since the epoch (Spark
            cannot read Parquet's nanosecond timestamps as timestamps).

    Returns:
        The contract's columns with the contract's types (a null-typed column becomes a null
        column of its type); ``event_ts`` floored to microseconds, Spark's precision.
    """
    event_ts = F.col("event_ts")
    if nanosecond_ts:
        # Integer floor division: a double would lose nanoseconds, `div` alone rounds towards zero before 1970.
        event_ts = F.timestamp_micros(F.expr("(event_ts - pmod(event_ts, 1000)) div 1000"))
    return events.select(*[(event_ts if f.name == "event_ts" else F.col(f.name)).cast(from_arrow_type(f.type)).alias(f.name) for f in EVENT_SCHEMA])


def keep_last_per_key(table: DataFrame, key: str) -> DataFrame:
    """One row per ``key`` in a side table: the last one read.

    Rule: files in name order, rows in file order; a later row replaces an earlier one, as
    an update sent after the original would. Deterministic whatever Spark's partitioning.

    Args:
        table: The side table with ``_source_file`` (file name) and ``_source_row`` (row
            index in that file), e.g. from Spark's ``_metadata`` column.
        key: The key column.

    Returns:
        ``table`` without the two source columns, one row per key.
    """
    latest_first = Window.partitionBy(key).orderBy(F.col("_source_file").desc(), F.col("_source_row").desc())
    return (
        table.withColumn("_rank", F.row_number().over(latest_first))
        .where(F.col("_rank") == 1)
        .select(*[c for c in table.columns if c not in ("_source_file", "_source_row")])
    )


def check_raw_schema(events: DataFrame) -> DataFrame:
    """Check the raw contract's columns and types, and select exactly those columns.

    Spark's schema is turned into Arrow types and judged by the same rule as the
    pre-flight check (:func:`pipeline.data.raw_files.schema_problems`).

    Raises:
        RawWindowError: Naming every missing column and every column of the wrong type.
    """
    from pyspark.sql.pandas.types import to_arrow_type

    fields = []
    for field in events.schema.fields:
        try:
            fields.append(pa.field(field.name, to_arrow_type(field.dataType, timezone="UTC")))
        except (TypeError, AssertionError, NotImplementedError):  # a type Arrow has no match for
            fields.append(pa.field(field.name, pa.null()))
    problems = schema_problems(pa.schema(fields))
    if problems:
        raise RawWindowError("raw events break the contract: " + "; ".join(problems))
    return events.select(*[F.col(c).cast("double") if c == "value" else F.col(c) for c in RAW_COLUMNS])


def with_id_hash(events: DataFrame) -> DataFrame:
    """The events with ``_id_hash``: the 64-bit ``xxhash64`` of ``event_id`` (null ids share one hash)."""
    return events.withColumn(ID_HASH, F.xxhash64("event_id"))


def repeated_id_hashes(hashed: DataFrame) -> DataFrame:
    """Every ``_id_hash`` on more than one row of ``hashed`` (:func:`with_id_hash`), with its ``_rows``.

    Exact duplicates and conflicting copies share an ``event_id``, so a row whose hash is
    not here has an id no other row has: it is distinct as it is, and never conflicts. Only
    one long a row is aggregated, where removing duplicates by content shuffles every column
    of every event. Two rows with a null id are both here; two ids with one hash (a
    collision) only make two more rows checked by content.
    """
    return hashed.groupBy(ID_HASH).agg(F.count(F.lit(1)).alias("_rows")).where(F.col("_rows") > 1)


def mark_repeated_ids(hashed: DataFrame, repeated: DataFrame) -> DataFrame:
    """``hashed`` with ``_repeated_id`` (its hash is in ``repeated``) in place of ``_id_hash``.

    ``repeated`` is broadcast (the caller bounds it by :data:`BROADCAST_CONFLICTS_MAX`): the
    events are neither moved nor sorted.
    """
    marks = F.broadcast(repeated.select(ID_HASH, F.lit(True).alias(REPEATED_ID)))
    return hashed.join(marks, on=ID_HASH, how="left").select(
        *[c for c in hashed.columns if c != ID_HASH], F.coalesce(F.col(REPEATED_ID), F.lit(False)).alias(REPEATED_ID))


def deduplicate_events(events: DataFrame) -> DataFrame:
    """Drop exact duplicates (same ``event_id`` and same content): at-least-once delivery.

    The result is hash-partitioned on ``event_id``, which :func:`conflicting_event_ids`
    and :func:`with_event_id_copies` need: cached, it serves both with no further shuffle.
    """
    return events.repartition("event_id").dropDuplicates(list(RAW_COLUMNS))


def with_single_copy(flagged: DataFrame) -> DataFrame:
    """Flagged events whose id no other row has, in :func:`with_event_id_copies`' columns (one copy each)."""
    return flagged.select(*RAW_COLUMNS, F.lit(1).alias(EVENT_ID_COPIES), "quarantine_reason")


def flag_invalid_events(events: DataFrame, window_start: dt.date, window_end: dt.date) -> DataFrame:
    """Add ``quarantine_reason`` by the row rules (null for a valid row); the first failing rule wins.

    The rules and their order are :data:`pipeline.data.contract.QUARANTINE_REASONS`; all
    but the last, ``conflicting_event_id``, which needs every copy of an ``event_id`` and is
    applied by :func:`with_event_id_copies`. The feature job flags the distinct events once,
    as it caches them: the string rules cost more than a scan of the cache.

    Args:
        events: Distinct events (contract columns, and any other columns, which are kept).
        window_start: First day of the window (inclusive).
        window_end: Last day of the window (inclusive).
    """
    start, end = window_bounds(window_start, window_end)
    null_id, blank_id = F.lit(False), F.lit(False)
    for column in ID_COLUMNS:
        null_id = null_id | F.col(column).isNull()
        blank_id = blank_id | _blank(F.col(column))
    reason = (
        F.when(null_id, "null_id")
        .when(blank_id, "blank_id")
        .when(F.col("event_type").isNull() | ~F.col("event_type").isin(*EVENT_TYPES), "unknown_event_type")
        .when(
            F.col("event_ts").isNull() | (F.col("event_ts") < F.lit(start)) | (F.col("event_ts") >= F.lit(end)),
            "timestamp_outside_window",
        )
        .when(F.isnan("value") | F.col("value").isin(float("inf"), float("-inf")), "non_finite_value")
        .when(F.col("value") < MIN_VALUE, "invalid_value")
    )
    return events.select(*events.columns, reason.alias("quarantine_reason"))


def with_blank_id_flags(events: DataFrame) -> DataFrame:
    """``events`` with :data:`~pipeline.data.contract.BLANK_ID_FLAGS`: each id is blank (null for a null id), for GX."""
    return events.select(*events.columns, *[_blank(F.col(column)).alias(flag) for column, flag in BLANK_ID_FLAGS.items()])


def _blank(value: Column) -> Column:
    """``value`` is empty or only :data:`~pipeline.data.contract.WHITESPACE` (null for null)."""
    # Only a value that starts with whitespace can be blank, so the trim (costly with a set of
    # characters) runs on those alone: the rule on three ids took 6 s at 10M events, 2.4 s so.
    starts_blank = F.substring(value, 1, 1).isin(*WHITESPACE)
    return F.when((value != "") & ~starts_blank, F.lit(False)).otherwise(F.btrim(value, F.lit(WHITESPACE)) == "")


def conflicting_event_ids(distinct: DataFrame) -> DataFrame:
    """``event_id`` and ``event_id_copies`` of every id shared by more than one distinct event.

    A hash aggregate on :func:`deduplicate_events`' partitioning: no shuffle and no sort (a
    window over ``event_id`` would sort every event). Null ids are left out: they are
    quarantined as ``null_id`` and never conflict.
    """
    return (
        distinct.groupBy("event_id").agg(F.count(F.lit(1)).cast("int").alias(EVENT_ID_COPIES))
        .where((F.col(EVENT_ID_COPIES) > 1) & F.col("event_id").isNotNull())
    )


def with_event_id_copies(flagged: DataFrame, conflicting: DataFrame, broadcast: bool) -> DataFrame:
    """The flagged distinct events with ``event_id_copies``, how many distinct events share the
    row's ``event_id`` (1 unless it is in ``conflicting``), and the last rule applied: a row
    no other rule flagged is quarantined as ``conflicting_event_id`` when its id has copies.

    Neither join moves or sorts the events. ``broadcast`` (when the conflicting ids, a data
    fault, are few: every later scan then costs a hash lookup per row) sends them to every
    task; otherwise a shuffled hash join is built on them over the events' partitioning.

    Args:
        flagged: Distinct events with the row rules' ``quarantine_reason`` (:func:`flag_invalid_events`).
        conflicting: :func:`conflicting_event_ids` of the same events.
        broadcast: Send ``conflicting`` to every task.
    """
    conflicting = F.broadcast(conflicting) if broadcast else conflicting.hint("shuffle_hash")
    copies = F.coalesce(F.col(EVENT_ID_COPIES), F.lit(1))
    return (
        flagged.join(conflicting, on="event_id", how="left")
        .select(*RAW_COLUMNS, copies.alias(EVENT_ID_COPIES),
                F.coalesce(F.col("quarantine_reason"), F.when(copies > 1, F.lit("conflicting_event_id"))).alias("quarantine_reason"))
    )
