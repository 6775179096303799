"""Builders of tiny raw-log layouts for tests."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from pathlib import Path

import pyarrow as pa

from pipeline.data.contract import EVENT_SCHEMA, ITEM_SCHEMA, USER_SCHEMA, event_partition_dir, write_table

UTC = dt.timezone.utc


def ts(day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    """A UTC timestamp on day ``day`` of January 2024."""
    return dt.datetime(2024, 1, day, hour, minute, tzinfo=UTC)


def event(event_id, user_id, item_id, event_type, when, value=None, session_id=None) -> dict:
    return dict(event_id=event_id, user_id=user_id, item_id=item_id, event_type=event_type,
                event_ts=when, value=value, session_id=session_id)


# Eight valid events over Jan 1-3: alice touches i1..i5, bob i1 and i2.
ALICE_BOB_EVENTS = [
    event("e1", "alice", "i1", "view", ts(1, 8)),
    event("e2", "alice", "i1", "purchase", ts(1, 9), value=10.0),
    event("e3", "alice", "i2", "click", ts(1, 10)),
    event("e4", "alice", "i3", "view", ts(2, 8)),
    event("e5", "alice", "i4", "add_to_cart", ts(2, 9)),
    event("e6", "alice", "i5", "view", ts(3, 8)),
    event("e7", "bob", "i1", "view", ts(2, 10)),
    event("e8", "bob", "i2", "click", ts(3, 12)),
]


def write_raw(raw_root: Path, events: list[dict], items: list[str] = (), users: list[str] = (),
              partition_of=None) -> Path:
    """Write events one partition per UTC day (or per ``partition_of(event)``), plus side tables."""
    by_day = defaultdict(list)
    for row in events:
        by_day[partition_of(row) if partition_of else row["event_ts"].date()].append(row)
    # Nullable on purpose: tests write the faulty rows a real producer might send.
    loose = pa.schema([f.with_nullable(True) for f in EVENT_SCHEMA])
    for day, rows in by_day.items():
        write_table(pa.Table.from_pylist(rows, schema=loose), event_partition_dir(raw_root, day) / "part-00000.parquet")
    write_table(pa.Table.from_pylist(
        [dict(item_id=i, title=f"title {i}", year=2000 + n, categories=[f"cat{n % 2}"]) for n, i in enumerate(items)],
        schema=ITEM_SCHEMA), raw_root / "items" / "items.parquet")
    write_table(pa.Table.from_pylist(
        [dict(user_id=u, age=20 + n, gender="F", occupation="engineer") for n, u in enumerate(users)],
        schema=USER_SCHEMA), raw_root / "users" / "users.parquet")
    return raw_root
