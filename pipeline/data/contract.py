"""The raw user-behaviour event-log contract: layout, schema, what makes a row valid.

Layout under a raw root::

    <raw>/events/ds=YYYY-MM-DD/part-*.parquet   one partition per UTC day
    <raw>/items/items.parquet                   item catalogue
    <raw>/users/users.parquet                   user profiles

This module is the one statement of the contract. The pre-flight check
(:func:`check_raw_window`), the Spark feature job (schema check and quarantine rules) and
the GX raw suite all read the schema, the row rules and the window listing from here, and
all raise :class:`RawWindowError` when a window cannot be processed.

Every writer in this project goes through :func:`write_event_partition` and
:func:`write_table`, so files appear atomically (written aside, then renamed).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

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

# What makes an event row valid. A row breaking a rule is quarantined with the rule's
# reason; the first failing rule (in this order) names it.
ID_COLUMNS = ("event_id", "user_id", "item_id")  # rule "null_id": none of them may be null
MIN_VALUE = 0.0  # rule "invalid_value": `value` is null, or a number >= MIN_VALUE (NaN is not)
QUARANTINE_REASONS = (
    "null_id",                   # an id column is null
    "unknown_event_type",        # event_type is null or not in EVENT_TYPES
    "timestamp_outside_window",  # event_ts is null or outside [window start, window end + 1 day) UTC
    "invalid_value",             # value is NaN or below MIN_VALUE
    "conflicting_event_id",      # one event_id with different content (exact copies are dropped)
)
PARTITION_KEY = "ds"


class RawWindowError(ValueError):
    """The raw window cannot be processed: no partitions, too few rows, a corrupt file, a
    missing column or one of the wrong type, or too many quarantined rows."""


def event_partition_dir(raw_root: str | Path, ds: dt.date) -> Path:
    """Directory of one day's events: ``<raw>/events/ds=YYYY-MM-DD``."""
    return Path(raw_root) / "events" / f"{PARTITION_KEY}={ds.isoformat()}"


def window_days(window_start: dt.date, window_end: dt.date) -> list[dt.date]:
    """Every day of ``[window_start, window_end]``, oldest first."""
    return [window_start + dt.timedelta(days=i) for i in range((window_end - window_start).days + 1)]


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


def compatible(found: pa.DataType, wanted: pa.DataType) -> bool:
    """Whether a column stored as ``found`` satisfies the contract's ``wanted`` type.

    Any timestamp unit is accepted but it must carry a time zone (UTC adjusted); float32
    for float64; large strings for strings.
    """
    if pa.types.is_timestamp(wanted):
        return pa.types.is_timestamp(found) and found.tz is not None
    if pa.types.is_floating(wanted):
        return pa.types.is_floating(found)
    if pa.types.is_string(wanted):
        return pa.types.is_string(found) or pa.types.is_large_string(found)
    return found == wanted


def schema_problems(schema: pa.Schema) -> list[str]:
    """Every way ``schema`` breaks :data:`EVENT_SCHEMA`: missing columns and wrong types."""
    missing = [f.name for f in EVENT_SCHEMA if f.name not in schema.names]
    wrong = [f"{f.name} is {schema.field(f.name).type}, expected {f.type}" for f in EVENT_SCHEMA
             if f.name in schema.names and not compatible(schema.field(f.name).type, f.type)]
    return ([f"lacks column(s) {missing}"] if missing else []) + wrong


def check_raw_window(raw_root: str | Path, window_start: dt.date, window_end: dt.date, min_events: int) -> dict:
    """Cheap structural checks of the raw window from Parquet footers alone (no Spark).

    Every partition file must open as Parquet and hold the contract's columns with their
    types; the window must hold at least ``min_events`` rows. Row-level checks (nulls,
    event types, duplicates) run in the Spark job's GX suite.

    Returns:
        ``{"partitions", "files", "rows"}``.

    Raises:
        RawWindowError: Naming the file or column at fault.
    """
    partitions = window_partitions(raw_root, window_start, window_end)
    files, rows = 0, 0
    for partition in partitions:
        for path in sorted(partition.glob("*.parquet")):
            try:
                meta = pq.read_metadata(path)
                schema = pq.read_schema(path)
            except (pa.ArrowInvalid, OSError) as err:
                raise RawWindowError(f"corrupt Parquet file {path}: {err}") from err
            problems = schema_problems(schema)
            if problems:
                raise RawWindowError(f"{path}: " + "; ".join(problems))
            files += 1
            rows += meta.num_rows
    if rows < min_events:
        raise RawWindowError(f"empty window: {rows} event(s) in ds={window_start}..ds={window_end}, need >= {min_events}")
    log.info("raw window ds=%s..ds=%s: %d partitions, %d files, %d rows", window_start, window_end, len(partitions), files, rows)
    return {"partitions": len(partitions), "files": files, "rows": rows}


def write_table(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` to ``path`` atomically: a temporary file beside it, then a rename.

    Args:
        table: The rows to write.
        path: Destination file; its parent directories are created.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
