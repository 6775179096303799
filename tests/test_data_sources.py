"""The MovieLens converter and the synthetic log generator write the raw contract."""

from __future__ import annotations

import datetime as dt
import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.data import (
    EVENT_SCHEMA,
    EVENT_TYPES,
    ITEM_SCHEMA,
    USER_SCHEMA,
)
from pipeline.data import movielens, synthetic
from pipeline.data.movielens import convert_movielens
from pipeline.data.synthetic import generate_synthetic_logs

UTC = dt.timezone.utc


def _event_files(raw_root: Path) -> list[Path]:
    return sorted((raw_root / "events").glob("ds=*/part-*.parquet"))


def _read_events(raw_root: Path) -> pa.Table:
    """All events with their partition's ``ds``, in a canonical row order."""
    tables = []
    for path in _event_files(raw_root):
        table = pq.read_table(path)
        ds = path.parent.name.removeprefix("ds=")
        tables.append(table.append_column("ds", pa.array([ds] * table.num_rows, pa.string())))
    return pa.concat_tables(tables).sort_by("event_id")


def _file_bytes(raw_root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(raw_root)): p.read_bytes() for p in sorted(raw_root.rglob("*.parquet"))}


# --- MovieLens -------------------------------------------------------------------------

# 874713600 is 1997-09-20 00:00:00 UTC.
_TINY_INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
7\t10\t4\t874717200
12\t10\t5\t874799999
7\t20\t3\t874800000
12\t20\t1\t874717200
"""
_TINY_ITEM = """item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq
10\tToy Story\t1995\tAnimation Children's Comedy
20\tLand Before Time III (1995)\tV\tDrama
"""
_TINY_USER = """user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token
7\t24\tM\ttechnician\t85711
12\t53\tF\tother\t94043
"""


@pytest.fixture
def tiny_movielens_dir(tmp_path: Path) -> Path:
    source = tmp_path / "ml-100k"
    source.mkdir()
    (source / "ml-100k.inter").write_text(_TINY_INTER)
    (source / "ml-100k.item").write_text(_TINY_ITEM)
    (source / "ml-100k.user").write_text(_TINY_USER)
    return source


def test_convert_movielens_writes_exact_events_by_utc_day(tmp_path, tiny_movielens_dir):
    raw_root = tmp_path / "raw"

    summary = convert_movielens(raw_root, source_dir=tiny_movielens_dir)

    assert summary == {
        "raw_root": str(raw_root),
        "events": 4,
        "days": 2,
        "first_ds": "1997-09-20",
        "last_ds": "1997-09-21",
        "users": 2,
        "items": 2,
    }
    assert [p.relative_to(raw_root).as_posix() for p in _event_files(raw_root)] == [
        "events/ds=1997-09-20/part-00000.parquet",
        "events/ds=1997-09-21/part-00000.parquet",
    ]
    first_day = pq.read_table(raw_root / "events/ds=1997-09-20/part-00000.parquet")
    second_day = pq.read_table(raw_root / "events/ds=1997-09-21/part-00000.parquet")
    assert first_day.schema.equals(EVENT_SCHEMA)
    assert second_day.schema.equals(EVENT_SCHEMA)

    def rate(user, item, when, rating, seconds):
        return {
            "event_id": f"ml100k-{user}-{item}-{seconds}",
            "user_id": user,
            "item_id": item,
            "event_type": "rate",
            "event_ts": when.replace(tzinfo=UTC),
            "value": rating,
            "session_id": None,
        }

    # Rows sort by time, then user_id as a string: "12" comes before "7" at 01:00.
    assert first_day.to_pylist() == [
        rate("12", "20", dt.datetime(1997, 9, 20, 1, 0, 0), 1.0, 874717200),
        rate("7", "10", dt.datetime(1997, 9, 20, 1, 0, 0), 4.0, 874717200),
        rate("12", "10", dt.datetime(1997, 9, 20, 23, 59, 59), 5.0, 874799999),
    ]
    assert second_day.to_pylist() == [rate("7", "20", dt.datetime(1997, 9, 21), 3.0, 874800000)]


def test_convert_movielens_items_and_users(tmp_path, tiny_movielens_dir):
    convert_movielens(tmp_path / "raw", source_dir=tiny_movielens_dir)

    items = pq.read_table(tmp_path / "raw/items/items.parquet")
    users = pq.read_table(tmp_path / "raw/users/users.parquet")

    assert items.schema.equals(ITEM_SCHEMA)
    assert users.schema.equals(USER_SCHEMA)
    assert items.to_pylist() == [
        {"item_id": "10", "title": "Toy Story", "year": 1995, "categories": ["Animation", "Children's", "Comedy"]},
        # "V" is not a year: null rather than a failed cast.
        {"item_id": "20", "title": "Land Before Time III (1995)", "year": None, "categories": ["Drama"]},
    ]
    assert users.to_pylist() == [
        {"user_id": "7", "age": 24, "gender": "M", "occupation": "technician"},
        {"user_id": "12", "age": 53, "gender": "F", "occupation": "other"},
    ]


def test_convert_movielens_is_byte_identical_on_rerun(tmp_path, tiny_movielens_dir):
    convert_movielens(tmp_path / "first", source_dir=tiny_movielens_dir)
    convert_movielens(tmp_path / "second", source_dir=tiny_movielens_dir)

    assert _file_bytes(tmp_path / "first") == _file_bytes(tmp_path / "second")


def test_convert_movielens_names_missing_file(tmp_path, tiny_movielens_dir):
    (tiny_movielens_dir / "ml-100k.user").unlink()

    with pytest.raises(movielens.MovieLensSourceError, match="ml-100k.user"):
        convert_movielens(tmp_path / "raw", source_dir=tiny_movielens_dir)


def test_convert_movielens_names_missing_column(tmp_path, tiny_movielens_dir):
    (tiny_movielens_dir / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\n7\t10\t4\n")

    with pytest.raises(movielens.MovieLensSourceError, match="timestamp"):
        convert_movielens(tmp_path / "raw", source_dir=tiny_movielens_dir)


def test_missing_recbole_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(movielens.importlib.util, "find_spec", lambda name: None)

    with pytest.raises(movielens.MovieLensSourceError, match=r"pip install --no-deps recbole==1\.2\.1"):
        convert_movielens(tmp_path / "raw")


def test_convert_shipped_movielens_100k(tmp_path):
    if importlib.util.find_spec("recbole") is None:
        pytest.skip(f"recbole is not installed; `{movielens.RECBOLE_PIP_COMMAND}` provides ML-100K")

    summary = convert_movielens(tmp_path / "raw")

    assert (summary["events"], summary["users"], summary["items"]) == (100_000, 943, 1682)
    assert (summary["first_ds"], summary["last_ds"]) == ("1997-09-20", "1998-04-22")
    events = _read_events(tmp_path / "raw")
    assert events.num_rows == 100_000
    assert pc.count_distinct(events["event_id"]).as_py() == 100_000
    assert pc.count_distinct(events["ds"]).as_py() == summary["days"]
    assert pc.all(pc.equal(pc.strftime(events["event_ts"], "%Y-%m-%d"), events["ds"])).as_py()
    assert set(pc.unique(events["value"]).to_pylist()) == {1.0, 2.0, 3.0, 4.0, 5.0}


# --- Synthetic -------------------------------------------------------------------------

_SYNTHETIC_ARGS = dict(users=300, items=200, days=3, events=20_000, seed=3, end_date=dt.date(2024, 1, 31))


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    raw_root = tmp_path_factory.mktemp("synthetic") / "raw"
    generate_synthetic_logs(raw_root, **_SYNTHETIC_ARGS)
    return raw_root


@pytest.fixture(scope="module")
def synthetic_events(synthetic_root) -> pa.Table:
    return _read_events(synthetic_root)


def test_synthetic_writes_the_contract(synthetic_root, synthetic_events):
    for path in _event_files(synthetic_root):
        assert pq.read_table(path).schema.equals(EVENT_SCHEMA)
    assert pq.read_table(synthetic_root / "items/items.parquet").schema.equals(ITEM_SCHEMA)
    assert pq.read_table(synthetic_root / "users/users.parquet").schema.equals(USER_SCHEMA)

    events = synthetic_events
    assert events.num_rows == 20_000
    assert pc.count_distinct(events["event_id"]).as_py() == 20_000
    assert sorted(pc.unique(events["ds"]).to_pylist()) == ["2024-01-29", "2024-01-30", "2024-01-31"]
    assert pc.all(pc.equal(pc.strftime(events["event_ts"], "%Y-%m-%d"), events["ds"])).as_py()
    assert set(pc.unique(events["event_type"]).to_pylist()) == set(EVENT_TYPES)


def test_synthetic_event_mix_and_values(synthetic_events):
    frame = synthetic_events.to_pandas()
    counts = frame["event_type"].value_counts()
    assert list(counts.index[:3]) == ["view", "click", "add_to_cart"]

    valued = frame["value"].notna()
    assert set(frame.loc[valued, "event_type"]) == {"purchase", "rate"}
    assert (frame.loc[frame["event_type"] == "purchase", "value"] > 0).all()
    ratings = frame.loc[frame["event_type"] == "rate", "value"]
    assert set(ratings.unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert frame.loc[frame["event_type"].isin(["purchase", "rate"]), "value"].notna().all()


def test_synthetic_sessions_are_one_user_with_increasing_time(synthetic_events):
    frame = synthetic_events.to_pandas().sort_values(["session_id", "event_id"])
    per_session = frame.groupby("session_id")

    assert (per_session["user_id"].nunique() == 1).all()
    assert per_session["event_ts"].apply(lambda ts: ts.is_monotonic_increasing and ts.is_unique).all()
    assert 2.0 < per_session.size().mean() < 8.0
    first_events = per_session.head(1)
    assert (first_events["event_type"] == "view").all()


def test_synthetic_catalogue(synthetic_root):
    items = pq.read_table(synthetic_root / "items/items.parquet").to_pandas()
    users = pq.read_table(synthetic_root / "users/users.parquet").to_pandas()

    assert len(items) == 200 and items["item_id"].is_unique
    assert len(users) == 300 and users["user_id"].is_unique
    assert items["categories"].map(len).between(1, 2).all()
    assert items["year"].notna().all()
    assert users[["age", "gender", "occupation"]].notna().all().all()


def test_synthetic_is_deterministic_per_seed(tmp_path, synthetic_root):
    generate_synthetic_logs(tmp_path / "same", **_SYNTHETIC_ARGS)
    generate_synthetic_logs(tmp_path / "other", **{**_SYNTHETIC_ARGS, "seed": 4})

    assert _file_bytes(tmp_path / "same") == _file_bytes(synthetic_root)
    assert not _read_events(tmp_path / "other").equals(_read_events(synthetic_root))


def test_synthetic_rows_do_not_depend_on_file_size(tmp_path, monkeypatch):
    # Small blocks, so that one day spans several blocks and files.
    monkeypatch.setattr(synthetic, "BLOCK_EVENTS", 1_000)
    args = {**_SYNTHETIC_ARGS, "days": 2, "events": 9_000}
    one_file = generate_synthetic_logs(tmp_path / "whole", **args)
    split = generate_synthetic_logs(tmp_path / "split", **args, events_per_file=2_000)

    assert one_file["files"] == 2 and split["files"] > 4
    assert _read_events(tmp_path / "split").equals(_read_events(tmp_path / "whole"))

    # Rewriting the split root with whole days removes the now-stale part files.
    generate_synthetic_logs(tmp_path / "split", **args)
    assert _file_bytes(tmp_path / "split") == _file_bytes(tmp_path / "whole")


def test_synthetic_popularity_is_skewed(synthetic_events):
    per_item = pc.value_counts(synthetic_events["item_id"]).field("counts").to_numpy()
    top_decile = np.sort(per_item)[::-1][: 200 // 10]

    # Uniform popularity would give the top 10% of items about 10% of events.
    assert top_decile.sum() / per_item.sum() > 0.3


def test_synthetic_users_concentrate_on_their_taste(synthetic_root, synthetic_events):
    items = pq.read_table(synthetic_root / "items/items.parquet").to_pandas()
    primary_category = dict(zip(items["item_id"], items["categories"].map(lambda c: c[0])))
    frame = synthetic_events.select(["user_id", "item_id"]).to_pandas()
    frame["category"] = frame["item_id"].map(primary_category)

    def mean_top_category_share(users: np.ndarray) -> float:
        shares = frame.assign(user_id=users).groupby("user_id")["category"].agg(
            lambda c: c.value_counts(normalize=True).iloc[0]
        )
        return float(shares.mean())

    observed = mean_top_category_share(frame["user_id"].to_numpy())
    # Shuffling users over events keeps popularity and activity but removes taste.
    shuffled = mean_top_category_share(np.random.default_rng(0).permutation(frame["user_id"].to_numpy()))
    assert observed > shuffled + 0.2


@pytest.mark.parametrize(
    "override, message",
    [
        ({"users": 0}, "users must be an integer >= 1"),
        ({"events": -1}, "events must be an integer >= 0"),
        ({"end_date": "31/01/2024"}, "end_date must be a date YYYY-MM-DD"),
    ],
)
def test_synthetic_rejects_bad_arguments(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        generate_synthetic_logs(tmp_path / "raw", **{**_SYNTHETIC_ARGS, **override})
