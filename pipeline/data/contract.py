"""The raw user-behaviour event-log contract: layout, schema, what makes a row valid.

Layout under a raw root::

    <raw>/events/ds=YYYY-MM-DD/part-*.parquet   one partition per UTC day
    <raw>/items/items.parquet                   item catalogue
    <raw>/users/users.parquet                   user profiles

This module is the one statement of the contract. The pre-flight check, the Spark feature
job (schema check and quarantine rules) and the GX raw suite all read the schema, the row
rules and the window listing from here, and all raise :class:`RawWindowError` when a window
cannot be processed. Which files are data and whether what they store satisfies these
schemas is :mod:`pipeline.data.raw_files`.

Every writer in this project goes through :func:`write_event_partition` and
:func:`write_table`, so files appear atomically (written aside, then renamed).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import atomic_file

EVENT_TYPES = ("view", "click", "add_to_cart", "purchase", "rate")

EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("event_ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("value", pa.float64()),  # rating for `rate`, price for `purchase`
        pa.field("session_id", pa.string()),
    ]
)

ITEM_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("year", pa.int32()),
        pa.field("categories", pa.list_(pa.string())),
    ]
)

USER_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("age", pa.int32()),
        pa.field("gender", pa.string()),
        pa.field("occupation", pa.string()),
    ]
)

# The side tables beside the events, by directory name under the raw root. Their first
# column is the key; when a key appears more than once the last row read wins, files in
# name order and rows in file order (see
# spark_jobs.event_rules.keep_last_per_key).
SIDE_TABLES = {"items": ITEM_SCHEMA, "users": USER_SCHEMA}

# What makes an event row valid. A row breaking a rule is quarantined with the rule's
# reason; the first failing rule (in this order) names it.
ID_COLUMNS = ("event_id", "user_id", "item_id")  # rules "null_id" and "blank_id" apply to each
# Unicode's White_Space characters, spelled out so that every engine (Spark's btrim, DuckDB's
# trim, Python's strip) agrees on what a whitespace-only id is.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
MIN_VALUE = 0.0  # `value` is null, or a finite number >= MIN_VALUE
QUARANTINE_REASONS = (
    "null_id",                   # an id column is null
    "blank_id",                  # an id column is empty or only WHITESPACE: no real user, item or event
    "unknown_event_type",        # event_type is null or not in EVENT_TYPES
    "timestamp_outside_window",  # event_ts is null or outside [window start, window end + 1 day) UTC
    "non_finite_value",          # value is NaN, +inf or -inf
    "invalid_value",             # value is below MIN_VALUE
    "conflicting_event_id",      # one event_id with different content (exact copies are dropped)
)
# Deduplicated events carry this count of the distinct events sharing their event_id: the
# input of "conflicting_event_id", computed once by the feature job and checked by GX.
EVENT_ID_COPIES = "event_id_copies"
# ... and, per id column, whether the value is blank (rule "blank_id"), for GX too: GX has no
# trim, and a regex turns every value into a Java string (5 s over three ids at 10M events).
BLANK_ID_FLAGS = {column: f"{column}_is_blank" for column in ID_COLUMNS}
PARTITION_KEY = "ds"


class RawWindowError(ValueError):
    """The raw window cannot be processed: no partitions, too few rows, a corrupt file, a
    file the contract does not name, a missing column or one of the wrong type, or too many
    quarantined rows. The message names the input, the column and the rule at fault."""


def event_partition_dir(raw_root: str | Path, ds: dt.date) -> Path:
    """Directory of one day's events: ``<raw>/events/ds=YYYY-MM-DD``."""
    return Path(raw_root) / "events" / f"{PARTITION_KEY}={ds.isoformat()}"


def window_days(window_start: dt.date, window_end: dt.date) -> list[dt.date]:
    """Every day of ``[window_start, window_end]``, oldest first."""
    return [window_start + dt.timedelta(days=i) for i in range((window_end - window_start).days + 1)]


def side_table_dir(raw_root: str | Path, name: str) -> Path:
    """Directory of one side table: ``<raw>/items`` or ``<raw>/users``."""
    return Path(raw_root) / name


def window_partitions(raw_root: str | Path, window_start: dt.date, window_end: dt.date) -> list[Path]:
    """The existing event partition directories inside the window, oldest first.

    Raises:
        RawWindowError: When the window holds no partition at all.
    """
    partitions = [p for p in (event_partition_dir(raw_root, day) for day in window_days(window_start, window_end)) if p.is_dir()]
    if not partitions:
        raise RawWindowError(f"empty window: no event partitions ds={window_start}..ds={window_end} under {Path(raw_root) / 'events'}")
    return partitions


def window_bounds(window_start: dt.date, window_end: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """UTC-aware ``[start, end)`` of the window: its first midnight and the midnight after its last day.

    Naive datetimes would be read in a process's local time zone (Spark's driver, GX).
    """
    start = dt.datetime.combine(window_start, dt.time.min, tzinfo=dt.timezone.utc)
    end = dt.datetime.combine(window_end + dt.timedelta(days=1), dt.time.min, tzinfo=dt.timezone.utc)
    return start, end


def write_table(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` to ``path`` atomically (:func:`pipeline.io.atomic_file`).

    Args:
        table: The rows to write.
        path: Destination file; its parent directories are created.

    Returns:
        The destination path.
    """
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def write_event_partition(table: pa.Table, raw_root: str | Path, ds: dt.date, part: int = 0) -> Path:
    """Write one file of one day's events, cast to :data:`EVENT_SCHEMA`.

    Args:
        table: Events of day ``ds``, with the contract's columns.
        raw_root: The raw root directory.
        ds: The UTC day the events belong to.
        part: File number inside the partition, for days written in chunks.

    Returns:
        The written file's path.
    """
    table = table.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA)
    return write_table(table, event_partition_dir(raw_root, ds) / f"part-{part:05d}.parquet")
