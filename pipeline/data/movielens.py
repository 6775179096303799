"""Convert MovieLens-100K into the raw event-log layout of :mod:`pipeline.data.contract`.

The data comes from the ``recbole==1.2.1`` wheel, which ships ML-100K as atomic files
under ``recbole/dataset_example/ml-100k/``: tab-separated, no quoting, and a header whose
names carry a ``:type`` suffix (``user_id:token``, ``rating:float``, ``class:token_seq``).

Every rating becomes one ``rate`` event. ``session_id`` stays null: a MovieLens rating is
a bulk rating of films seen long before, not a step of a browsing visit, and inventing
sessions would hand downstream stages structure the data does not have.

Run as ``python -m pipeline.data.movielens --out <raw_root>``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline.data.contract import ITEM_SCHEMA, USER_SCHEMA, write_event_partition, write_table

logger = logging.getLogger(__name__)

RECBOLE_PIP_COMMAND = "pip install --no-deps recbole==1.2.1"
EVENT_ID_PREFIX = "ml100k"
SECONDS_PER_DAY = 86_400
_MICROS_PER_SECOND = 1_000_000


class MovieLensSourceError(FileNotFoundError):
    """The MovieLens-100K atomic files cannot be found."""


def find_movielens_dir() -> Path:
    """Locate ML-100K inside the installed ``recbole`` package without importing it.

    ``recbole``'s own dependencies (torch among them) are not installed, so importing it
    would fail; ``find_spec`` of a top-level package only resolves where it lives.

    Returns:
        The directory holding ``ml-100k.inter``, ``ml-100k.item`` and ``ml-100k.user``.

    Raises:
        MovieLensSourceError: When ``recbole`` is not installed or lacks the data.
    """
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise MovieLensSourceError(
            f"MovieLens-100K is read from the recbole wheel, which is not installed; "
            f"run `{RECBOLE_PIP_COMMAND}` or pass source_dir."
        )
    source_dir = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not source_dir.is_dir():
        raise MovieLensSourceError(
            f"recbole is installed but {source_dir} does not exist; "
            f"reinstall it with `{RECBOLE_PIP_COMMAND}` or pass source_dir."
        )
    return source_dir


def _read_atomic_file(path: Path, column_types: dict[str, pa.DataType]) -> pa.Table:
    """Read one RecBole atomic file, dropping the ``:type`` suffixes from its header.

    Columns not named in ``column_types`` are read as strings; empty fields become null.
    """
    if not path.is_file():
        raise MovieLensSourceError(f"MovieLens file {path} is missing")
    with path.open(encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
    names = [column.split(":", 1)[0] for column in header]
    missing = sorted(set(column_types) - set(names))
    if missing:
        raise MovieLensSourceError(f"{path} lacks column(s) {missing}; header is {header}")
    return pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
        # Titles hold apostrophes and commas but never tabs; quoting would misread them.
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(
            column_types={name: column_types.get(name, pa.string()) for name in names},
            strings_can_be_null=True,
        ),
    )


def _build_events(ratings: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """Turn ratings into contract events, sorted by time, with each row's UTC day number.

    Returns:
        The events (without the ``ds`` column) and, per row, days since the Unix epoch.
    """
    # Parsed as float64 because the header says `timestamp:float`; the safe cast to
    # int64 then rejects any fractional second instead of silently truncating it.
    seconds = pc.cast(ratings["timestamp"], pa.int64())
    events = pa.table(
        {
            "event_id": pc.binary_join_element_wise(
                EVENT_ID_PREFIX, ratings["user_id"], ratings["item_id"], pc.cast(seconds, pa.string()), "-"
            ),
            "user_id": ratings["user_id"],
            "item_id": ratings["item_id"],
            "event_type": pa.array(["rate"] * ratings.num_rows, pa.string()),
            "event_ts": pc.cast(pc.multiply(seconds, _MICROS_PER_SECOND), pa.timestamp("us", tz="UTC")),
            "value": ratings["rating"],
            "session_id": pa.nulls(ratings.num_rows, pa.string()),
        }
    )
    # A total order on unique keys, so the files do not depend on the source's row order.
    events = events.sort_by([("event_ts", "ascending"), ("user_id", "ascending"), ("item_id", "ascending")])
    epoch_micros = pc.cast(events["event_ts"], pa.int64()).to_numpy()
    epoch_days = np.floor_divide(epoch_micros, SECONDS_PER_DAY * _MICROS_PER_SECOND)
    return events, epoch_days


def _build_items(movies: pa.Table) -> pa.Table:
    """Items in the contract's shape; a release year that is not a number becomes null."""
    raw_year = movies["release_year"]
    # ML-100K has a few broken rows ("unkonwn", "V"); casting them would raise.
    is_number = pc.fill_null(pc.match_substring_regex(raw_year, r"^\d+$"), False)
    year = pc.cast(pc.if_else(is_number, raw_year, pa.scalar(None, pa.string())), pa.int32())
    items = pa.table(
        {
            "item_id": movies["item_id"],
            "title": movies["movie_title"],
            "year": year,
            "categories": pc.utf8_split_whitespace(movies["class"]),
        }
    )
    return items.cast(ITEM_SCHEMA)


def _build_users(people: pa.Table) -> pa.Table:
    """Users in the contract's shape (``zip_code`` is not part of it)."""
    users = pa.table(
        {
            "user_id": people["user_id"],
            "age": pc.cast(people["age"], pa.int32()),
            "gender": people["gender"],
            "occupation": people["occupation"],
        }
    )
    return users.cast(USER_SCHEMA)


def convert_movielens(raw_root: str | Path, source_dir: str | Path | None = None) -> dict:
    """Write MovieLens-100K as raw events, items and users under ``raw_root``.

    One file per UTC day, ``<raw>/events/ds=YYYY-MM-DD/part-00000.parquet``, plus
    ``<raw>/items/items.parquet`` and ``<raw>/users/users.parquet``. Rows are fully
    ordered, so re-running writes byte-identical files. Partitions left by an earlier,
    different conversion under the same root are not removed.

    Args:
        raw_root: The raw root directory to write into.
        source_dir: Directory with ``ml-100k.{inter,item,user}``; by default the copy
            shipped in the installed ``recbole`` wheel.

    Returns:
        ``raw_root``, counts of ``events``, ``days``, ``users`` and ``items``, and the
        first and last ``ds`` as ``YYYY-MM-DD``.

    Raises:
        MovieLensSourceError: When the source files or their columns are missing.
    """
    started = time.monotonic()
    source_dir = Path(source_dir) if source_dir is not None else find_movielens_dir()
    ratings = _read_atomic_file(
        source_dir / "ml-100k.inter",
        {"user_id": pa.string(), "item_id": pa.string(), "rating": pa.float64(), "timestamp": pa.float64()},
    )
    movies = _read_atomic_file(
        source_dir / "ml-100k.item",
        {"item_id": pa.string(), "movie_title": pa.string(), "release_year": pa.string(), "class": pa.string()},
    )
    people = _read_atomic_file(
        source_dir / "ml-100k.user",
        {"user_id": pa.string(), "age": pa.string(), "gender": pa.string(), "occupation": pa.string()},
    )

    events, epoch_days = _build_events(ratings)
    # Events are sorted by time, so each UTC day is one contiguous run of rows.
    is_first_of_day = np.ones(len(epoch_days), dtype=bool)
    is_first_of_day[1:] = epoch_days[1:] != epoch_days[:-1]
    day_starts = np.flatnonzero(is_first_of_day)
    day_ends = np.r_[day_starts[1:], len(epoch_days)]
    written_days = []
    for start, end in zip(day_starts.tolist(), day_ends.tolist()):
        ds = dt.date(1970, 1, 1) + dt.timedelta(days=int(epoch_days[start]))
        write_event_partition(events.slice(start, end - start), raw_root, ds)
        written_days.append(ds)

    items = _build_items(movies)
    users = _build_users(people)
    write_table(items, Path(raw_root) / "items" / "items.parquet")
    write_table(users, Path(raw_root) / "users" / "users.parquet")

    summary = {
        "raw_root": str(raw_root),
        "events": events.num_rows,
        "days": len(written_days),
        "first_ds": written_days[0].isoformat() if written_days else None,
        "last_ds": written_days[-1].isoformat() if written_days else None,
        "users": users.num_rows,
        "items": items.num_rows,
    }
    logger.info(
        "movielens: %d events over %d days (%s..%s), %d users, %d items in %.1fs",
        summary["events"], summary["days"], summary["first_ds"], summary["last_ds"],
        summary["users"], summary["items"], time.monotonic() - started,
    )
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m pipeline.data.movielens --out <raw_root> [--source-dir DIR]``."""
    parser = argparse.ArgumentParser(description="Convert MovieLens-100K into the raw event-log layout.")
    parser.add_argument("--out", required=True, help="raw root directory to write into")
    parser.add_argument(
        "--source-dir", default=None, help="directory of ml-100k.{inter,item,user} (default: the recbole wheel)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    summary = convert_movielens(args.out, args.source_dir)
    print(
        f"movielens: events={summary['events']} days={summary['days']} first_ds={summary['first_ds']} "
        f"last_ds={summary['last_ds']} users={summary['users']} items={summary['items']} -> {summary['raw_root']}"
    )


if __name__ == "__main__":
    main()
