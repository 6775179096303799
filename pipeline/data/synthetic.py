"""Synthetic raw event logs with a learnable signal, for scale tests and unit tests.

The world (items with Zipf-like popularity and taste clusters, users with a taste and an
activity level, the item catalogue and user profiles) is drawn by
:mod:`pipeline.data.synthetic_world`. On top of it this module simulates traffic:

* **Sessions** are visits: a user, a start time in the UTC day and a few events whose
  timestamps increase inside the session. A session opens with a ``view``.
* **Events** pick an item by mixing taste and popularity: with probability
  ``TASTE_AFFINITY`` from the user's cluster (popularity-weighted inside it), otherwise
  from the whole catalogue. Clicks, carts, purchases and ratings usually act on the item
  just seen in the session, like a funnel. ``purchase`` carries the item's price,
  ``rate`` a 1-5 rating that is higher for items of the user's cluster; other events
  have a null value.

Determinism: everything derives from ``seed`` through ``numpy`` ``SeedSequence``
streams keyed by (purpose, day, block). Each day is generated in fixed blocks of
``BLOCK_EVENTS`` events, each block from its own stream, so the rows do not depend on
how blocks are grouped into files; the same arguments give byte-identical files.
Memory stays bounded by one file's worth of rows (``events_per_file``).

Run as ``python -m pipeline.data.synthetic --out DIR --users N --items N --days N
--events N --seed S [--end-date YYYY-MM-DD]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.contract import EVENT_TYPES, event_partition_dir, write_event_partition, write_table
from pipeline.data.synthetic_world import STREAM_BLOCK, STREAM_DAY_SPLIT, World, build_world, cumulative_share

logger = logging.getLogger(__name__)

# The shape of the simulated traffic. These are properties of the generator, not knobs of
# a pipeline run, so they live here rather than in pipeline/config.py.
DEFAULT_END_DATE = dt.date(2024, 1, 31)
TASTE_AFFINITY = 0.7  # share of fresh item picks drawn from the user's own cluster
# Event-type mix of the events after a session's opening view, in EVENT_TYPES order.
EVENT_TYPE_SHARES = {"view": 0.55, "click": 0.25, "add_to_cart": 0.10, "purchase": 0.05, "rate": 0.05}
SAME_ITEM_SHARE = 0.7  # a non-view event acts on the session's previous item this often
MEAN_SESSION_EVENTS = 4.0
MAX_SESSION_EVENTS = 30
MEAN_EVENT_GAP_SECONDS = 40.0
MIN_EVENT_GAP_SECONDS = 1.0
# With MAX_SESSION_EVENTS this keeps any session shorter than a day, so it fits in one.
MAX_EVENT_GAP_SECONDS = 1_800.0
WEEKEND_TRAFFIC_UPLIFT = 0.2
BLOCK_EVENTS = 1 << 16  # generation unit; fixed so the rows never depend on the file size
DEFAULT_EVENTS_PER_FILE = 1 << 20

_MICROS_PER_SECOND = 1_000_000
_MICROS_PER_DAY = 86_400 * _MICROS_PER_SECOND


def _events_per_day(events: int, days: list[dt.date], seed: int) -> np.ndarray:
    """Split the event total over the days, with a little more traffic at weekends."""
    rng = np.random.default_rng([seed, STREAM_DAY_SPLIT])
    weights = np.array([1.0 + WEEKEND_TRAFFIC_UPLIFT * (day.weekday() >= 5) for day in days])
    return rng.multinomial(events, weights / weights.sum())


def _generate_block(world: World, ds: dt.date, block: int, size: int, seed: int) -> dict[str, np.ndarray]:
    """Simulate ``size`` events of day ``ds``: whole sessions, the last one cut short.

    Returns:
        ``[size]`` numpy columns: ``ordinal`` (event number within the day), ``user``,
        ``item``, ``event_type`` (index into EVENT_TYPES), ``event_us``, ``value``
        (NaN for null) and ``session`` (session number within the day).
    """
    rng = np.random.default_rng([seed, STREAM_BLOCK, ds.toordinal(), block])

    # Sessions: lengths are at least 1, so `size` draws always cover `size` events.
    lengths = np.minimum(rng.geometric(1.0 / MEAN_SESSION_EVENTS, size=size), MAX_SESSION_EVENTS)
    ends = np.cumsum(lengths)
    sessions = int(np.searchsorted(ends, size)) + 1
    lengths = lengths[:sessions]
    lengths[-1] -= ends[sessions - 1] - size
    session_first = np.r_[0, np.cumsum(lengths)[:-1]]
    session_of_event = np.repeat(np.arange(sessions), lengths)
    position = np.arange(size) - session_first[session_of_event]
    session_user = np.searchsorted(world.user_cdf, rng.random(sessions), side="right")
    user = session_user[session_of_event]

    type_shares = np.array([EVENT_TYPE_SHARES[name] for name in EVENT_TYPES])
    event_type = np.searchsorted(cumulative_share(type_shares), rng.random(size), side="right")
    event_type[position == 0] = EVENT_TYPES.index("view")

    # Fresh picks mix taste and popularity; then funnel steps reuse the previous item.
    cluster = world.user_cluster[user]
    from_taste = rng.random(size) < TASTE_AFFINITY
    draw = rng.random(size)
    taste_pick = world.cluster_order[np.searchsorted(world.cluster_cdf, cluster + draw, side="right")]
    popular_pick = np.searchsorted(world.popularity_cdf, draw, side="right")
    fresh_item = np.where(from_taste, taste_pick, popular_pick)
    reuse = (rng.random(size) < SAME_ITEM_SHARE) & (event_type != EVENT_TYPES.index("view")) & (position > 0)
    # Each event points at the latest fresh pick at or before it; a session's first
    # event is always fresh, so the pointer never crosses into another session.
    source = np.maximum.accumulate(np.where(reuse, 0, np.arange(size)))
    item = fresh_item[source]

    value = np.full(size, np.nan)
    is_purchase = event_type == EVENT_TYPES.index("purchase")
    value[is_purchase] = world.item_price[item[is_purchase]]
    is_rate = event_type == EVENT_TYPES.index("rate")
    liked = world.item_cluster[item[is_rate]] == cluster[is_rate]
    rating = 2.8 + 1.2 * liked + world.item_quality[item[is_rate]] + rng.normal(0.0, 0.8, size=int(is_rate.sum()))
    value[is_rate] = np.clip(np.rint(rating), 1, 5)

    # Timestamps: strictly increasing gaps inside a session, and a start time chosen
    # so that the whole session fits in the day.
    gap_seconds = MIN_EVENT_GAP_SECONDS + rng.exponential(MEAN_EVENT_GAP_SECONDS, size=size)
    gap = (np.minimum(gap_seconds, MAX_EVENT_GAP_SECONDS) * _MICROS_PER_SECOND).astype(np.int64)
    gap[session_first] = 0
    elapsed = np.cumsum(gap)
    offset_in_session = elapsed - elapsed[session_first][session_of_event]
    duration = offset_in_session[np.r_[session_first[1:] - 1, size - 1]]
    start = (rng.random(sessions) * (_MICROS_PER_DAY - duration)).astype(np.int64)
    day_start_us = (ds - dt.date(1970, 1, 1)).days * _MICROS_PER_DAY
    event_us = day_start_us + start[session_of_event] + offset_in_session

    return {
        "ordinal": block * BLOCK_EVENTS + np.arange(size),
        "user": user,
        "item": item,
        "event_type": event_type,
        "event_us": event_us,
        "value": value,
        "session": block * BLOCK_EVENTS + session_of_event,
    }


def _events_table(world: World, ds: dt.date, columns: dict[str, np.ndarray]) -> pa.Table:
    """Contract rows from block columns, ordered by time (ties by event number)."""
    order = np.lexsort((columns["ordinal"], columns["event_us"]))
    day = ds.strftime("%Y%m%d")

    def numbered(prefix: str, numbers: np.ndarray) -> pa.Array:
        digits = pc.utf8_lpad(pc.cast(pa.array(numbers[order]), pa.string()), 9, "0")
        return pc.binary_join_element_wise(f"{prefix}-{day}-", digits, "")

    value = columns["value"][order]
    return pa.table(
        {
            "event_id": numbered("syn", columns["ordinal"]),
            "user_id": world.user_ids.take(pa.array(columns["user"][order])),
            "item_id": world.item_ids.take(pa.array(columns["item"][order])),
            "event_type": pa.array(EVENT_TYPES, pa.string()).take(pa.array(columns["event_type"][order])),
            "event_ts": pa.array(columns["event_us"][order], pa.timestamp("us", tz="UTC")),
            "value": pa.array(value, pa.float64(), mask=np.isnan(value)),
            "session_id": numbered("s", columns["session"]),
        }
    )


def _remove_stale_parts(raw_root: str | Path, ds: dt.date, parts_written: int) -> None:
    """Delete part files beyond this run's, so an earlier, larger run leaves no rows behind."""
    for path in event_partition_dir(raw_root, ds).glob("part-*.parquet"):
        number = path.stem.removeprefix("part-")
        if number.isdigit() and int(number) >= parts_written:
            path.unlink()


def generate_synthetic_logs(
    raw_root: str | Path,
    users: int,
    items: int,
    days: int,
    events: int,
    seed: int,
    end_date: dt.date | str = DEFAULT_END_DATE,
    *,
    events_per_file: int = DEFAULT_EVENTS_PER_FILE,
) -> dict:
    """Write a synthetic raw event log, item catalogue and user profiles under ``raw_root``.

    Events go to ``<raw>/events/ds=YYYY-MM-DD/part-NNNNN.parquet`` for the ``days`` days
    ending at ``end_date``; a day with no events gets no partition. Same arguments, same
    files; the rows (not their split into files) are also independent of
    ``events_per_file``. Part files beyond this run's in a written partition are removed;
    partitions of days outside the range are left alone.

    Args:
        raw_root: The raw root directory to write into.
        users: Number of users (ids ``u0`` ...).
        items: Number of items (ids ``i0`` ...).
        days: Number of UTC days covered.
        events: Exact total number of events.
        seed: Seed of every random draw.
        end_date: Last day, a date or ``YYYY-MM-DD``.
        events_per_file: Upper bound on rows per part file, which bounds memory; rounded
            up to whole blocks of ``BLOCK_EVENTS``.

    Returns:
        ``raw_root``, ``events``, ``days`` (partitions written), ``files``, ``users``,
        ``items``, ``first_ds``, ``last_ds`` and ``seconds``.

    Raises:
        ValueError: When a count is out of range or ``end_date`` is not a date.
    """
    for name, count, least in (("users", users, 1), ("items", items, 1), ("days", days, 1), ("events", events, 0)):
        if not isinstance(count, (int, np.integer)) or count < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {count!r}")
    if events_per_file < 1:
        raise ValueError(f"events_per_file must be >= 1, got {events_per_file!r}")
    if isinstance(end_date, str):
        try:
            end_date = dt.date.fromisoformat(end_date)
        except ValueError:
            raise ValueError(f"end_date must be a date YYYY-MM-DD, got {end_date!r}") from None

    started = time.monotonic()
    world, items_table, users_table = build_world(users, items, seed)
    write_table(items_table, Path(raw_root) / "items" / "items.parquet")
    write_table(users_table, Path(raw_root) / "users" / "users.parquet")

    calendar = [end_date - dt.timedelta(days=days - 1 - offset) for offset in range(days)]
    blocks_per_file = max(1, math.ceil(events_per_file / BLOCK_EVENTS))
    files = 0
    written_days = []
    for ds, day_events in zip(calendar, _events_per_day(events, calendar, seed).tolist()):
        if day_events == 0:
            continue
        block_sizes = [min(BLOCK_EVENTS, day_events - first) for first in range(0, day_events, BLOCK_EVENTS)]
        part = 0
        for first_block in range(0, len(block_sizes), blocks_per_file):
            blocks = [
                _generate_block(world, ds, block, block_sizes[block], seed)
                for block in range(first_block, min(first_block + blocks_per_file, len(block_sizes)))
            ]
            columns = {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}
            write_event_partition(_events_table(world, ds, columns), raw_root, ds, part=part)
            part += 1
        _remove_stale_parts(raw_root, ds, part)
        files += part
        written_days.append(ds)
        logger.debug("synthetic: %s %d events in %d file(s)", ds, day_events, part)

    summary = {
        "raw_root": str(raw_root),
        "events": int(events),
        "days": len(written_days),
        "files": files,
        "users": int(users),
        "items": int(items),
        "first_ds": written_days[0].isoformat() if written_days else None,
        "last_ds": written_days[-1].isoformat() if written_days else None,
        "seconds": round(time.monotonic() - started, 2),
    }
    logger.info(
        "synthetic: %d events over %d days (%s..%s) in %d files, %d users, %d items, seed %d, %.1fs",
        summary["events"], summary["days"], summary["first_ds"], summary["last_ds"], files,
        users, items, seed, summary["seconds"],
    )
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m pipeline.data.synthetic --out DIR --users N ... --seed S``."""
    parser = argparse.ArgumentParser(description="Generate a synthetic raw event log.")
    parser.add_argument("--out", required=True, help="raw root directory to write into")
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--days", type=int, required=True)
    parser.add_argument("--events", type=int, required=True, help="exact total number of events")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument(
        "--end-date", type=dt.date.fromisoformat, default=DEFAULT_END_DATE, help="last day, YYYY-MM-DD"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    summary = generate_synthetic_logs(
        args.out, args.users, args.items, args.days, args.events, args.seed, args.end_date
    )
    print(
        f"synthetic: events={summary['events']} days={summary['days']} first_ds={summary['first_ds']} "
        f"last_ds={summary['last_ds']} users={summary['users']} items={summary['items']} "
        f"files={summary['files']} seconds={summary['seconds']} -> {summary['raw_root']}"
    )


if __name__ == "__main__":
    main()
