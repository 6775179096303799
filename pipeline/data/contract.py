"""The raw user-behaviour event-log contract.

Layout under a raw root::

    <raw>/events/ds=YYYY-MM-DD/part-*.parquet   one partition per UTC day
    <raw>/items/items.parquet                   item catalogue
    <raw>/users/users.parquet                   user profiles

Every writer in this project goes through :func:`write_event_partition` and
:func:`write_table`, so files appear atomically (written aside, then renamed).
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

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


def event_partition_dir(raw_root: str | Path, ds: dt.date) -> Path:
    """Directory of one day's events: ``<raw>/events/ds=YYYY-MM-DD``."""
    return Path(raw_root) / "events" / f"ds={ds.isoformat()}"


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
