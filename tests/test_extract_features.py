"""Feature extraction: hand-worked features, the split rule, quarantine, idempotence, bad input."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from pipeline.config import ConfigError, FeatureConfig, parse_ds
from pipeline.data.contract import EVENT_SCHEMA, ITEM_SCHEMA, USER_SCHEMA, RawWindowError, event_partition_dir, write_table
from pipeline.data.raw_files import check_raw_window
from spark_jobs import cleaning
from spark_jobs import extract_features as job
from spark_jobs import event_rules as rules
from spark_jobs import feature_transforms as transforms
from spark_jobs.validation import DataValidationError
from tests.rawlogs import ALICE_BOB_EVENTS, event, ts, write_raw

DS = dt.date(2024, 1, 3)
CFG = FeatureConfig(window_days=3, history_length=2, shuffle_partitions=2, min_user_interactions=5)

# alice touches i1..i5 in time order; bob touches i1, i2 (fewer than 5: train-only).
ALICE_BOB = ALICE_BOB_EVENTS
ITEMS = ["i1", "i2", "i3", "i4", "i5", "i6"]


def frame(spark, rows):
    return rules.check_raw_schema(spark.createDataFrame(rows, schema=job_schema()))


def flag(distinct, broadcast=True, window_start=dt.date(2024, 1, 1)):
    """Every quarantine rule, applied as the job does: the row rules, then the conflict rule."""
    flagged = rules.flag_invalid_events(distinct, window_start, DS)
    return rules.with_event_id_copies(flagged, rules.conflicting_event_ids(flagged), broadcast)


def job_schema():
    return "event_id string, user_id string, item_id string, event_type string, event_ts timestamp, value double, session_id string"


def test_transform_matches_hand_worked_features(spark):
    items = spark.createDataFrame([(i, 2000 + n, [f"cat{n}"]) for n, i in enumerate(ITEMS)], "item_id string, year int, categories array<string>")
    users = spark.createDataFrame([("alice", 30, "F", "engineer")], "user_id string, age int, gender string, occupation string")
    tables = transforms.transform(frame(spark, ALICE_BOB), items, users, DS, CFG)

    # alice: 5 interactions >= 5 -> test = max(1, floor(0.5)) = 1 latest (i5), validation = the one before (i4).
    # i1 weight = view 1 + purchase 5 = 6.
    interactions = {(r.user_id, r.item_id): (r.split, r.weight, r.n_events) for r in tables.interactions.collect()}
    assert interactions == {
        ("alice", "i1"): ("train", 6.0, 2), ("alice", "i2"): ("train", 2.0, 1), ("alice", "i3"): ("train", 1.0, 1),
        ("alice", "i4"): ("validation", 3.0, 1), ("alice", "i5"): ("test", 1.0, 1),
        ("bob", "i1"): ("train", 1.0, 1), ("bob", "i2"): ("train", 2.0, 1),
    }
    users_out = {r.user_id: r for r in tables.user_features.collect()}
    alice, bob = users_out["alice"], users_out["bob"]
    # alice's train events: e1 view, e2 purchase, e3 click, e4 view (e5, e6 are held out).
    assert (alice.n_train, alice.n_validation, alice.n_test) == (3, 1, 1)
    assert (alice.n_view, alice.n_click, alice.n_add_to_cart, alice.n_purchase, alice.n_rate) == (2, 1, 0, 1, 0)
    # last train event Jan 2 08:00 -> window end Jan 4 00:00 = 40 h = 1.667 days.
    assert alice.recency_days == pytest.approx(40 / 24)
    assert alice.history_item_ids == ["i2", "i3"]  # last 2 train items, oldest first
    assert (alice.age, alice.gender) == (30, "F")
    assert bob.recency_days == pytest.approx(12 / 24)  # Jan 3 12:00 -> Jan 4 00:00
    assert bob.history_item_ids == ["i1", "i2"] and bob.age is None
    # A user with fewer train items than history_length keeps all of them (oldest first).
    longer = transforms.transform(frame(spark, ALICE_BOB), items, users, DS, dataclasses.replace(CFG, history_length=5))
    assert {r.user_id: r.history_item_ids for r in longer.user_features.collect()} == {"alice": ["i1", "i2", "i3"], "bob": ["i1", "i2"]}
    # history_length 1: the latest train item, for a user with held-out items (alice: i3, not
    # the held-out i4/i5) and for a train-only one (bob: i2 of his two).
    shorter = transforms.transform(frame(spark, ALICE_BOB), items, users, DS, dataclasses.replace(CFG, history_length=1))
    assert {r.user_id: r.history_item_ids for r in shorter.user_features.collect()} == {"alice": ["i3"], "bob": ["i2"]}
    # Vocabularies: sorted ids numbered from 1; the never-seen catalogue item i6 is included.
    expected_vocab = spark.createDataFrame([(i, n + 1) for n, i in enumerate(ITEMS)], "item_id string, item_idx int")
    assertDataFrameEqual(tables.item_vocab, expected_vocab)
    assert [(r.user_id, r.user_idx) for r in tables.user_vocab.orderBy("user_idx").collect()] == [("alice", 1), ("bob", 2)]
    assert bob.history_item_idx == [1, 2]
    # popularity = train interactions: i1 alice+bob = 2 (weights 6 + 1 = 7); i4, i5 held out -> 0.
    popularity = {r.item_id: (r.popularity, r.weighted_popularity, r.year) for r in tables.item_features.collect()}
    assert popularity == {"i1": (2, 7.0, 2000), "i2": (2, 4.0, 2001), "i3": (1, 1.0, 2002),
                          "i4": (0, 0.0, 2003), "i5": (0, 0.0, 2004), "i6": (0, 0.0, 2005)}


@pytest.mark.parametrize(
    "n, expected",
    [
        (4, {"train": 4}),  # below min_user_interactions: train-only
        (5, {"train": 3, "validation": 1, "test": 1}),  # floor(0.5) -> at least 1 each
        (20, {"train": 16, "validation": 2, "test": 2}),  # floor(2.0) = 2 each
        (29, {"train": 23, "validation": 3, "test": 3}),  # floor(2.9) = 2? no: floor(29 * 0.1) = 2 -> see below
    ],
)
def test_split_rule_counts(spark, n, expected):
    if n == 29:  # floor(2.9) = 2 each, 25 train
        expected = {"train": 25, "validation": 2, "test": 2}
    rows = [("u", f"i{k:02d}", 1.0, 1, ts(1, 0, k), ts(1, 0, k)) for k in range(n)]
    interactions = spark.createDataFrame(rows, "user_id string, item_id string, weight double, n_events int, first_ts timestamp, last_ts timestamp")
    split = transforms.split_interactions(interactions, CFG)
    counts = {r.split: r["count"] for r in split.groupBy("split").count().collect()}
    assert counts == expected
    # Chronological: every test interaction is later than every train interaction.
    latest_train = split.where("split = 'train'").agg(F.max("first_ts")).first()[0]
    if "test" in counts:
        assert split.where("split = 'test'").agg(F.min("first_ts")).first()[0] > latest_train


def test_exact_duplicates_removed_and_row_faults_quarantined(spark):
    rows = ALICE_BOB + [
        ALICE_BOB[0],  # exact duplicate: at-least-once delivery
        event("e9", None, "i1", "view", ts(2)),  # null user_id
        event("e10", "bob", "i3", "like", ts(2)),  # unknown event_type
        event("e11", "bob", "i3", "view", ts(5)),  # after the window
        event("e3", "alice", "i9", "click", ts(1, 10)),  # e3 again, other content: conflict
        event("e12", "bob", "i3", "purchase", ts(2), value=-1.0),  # negative value
    ]
    distinct = rules.deduplicate_events(frame(spark, rows))
    assert distinct.count() == len(rows) - 1
    assert [(r.event_id, r.event_id_copies) for r in rules.conflicting_event_ids(distinct).collect()] == [("e3", 2)]
    for broadcast in (True, False):
        flagged = flag(distinct, broadcast)
        reasons = {r.event_id + "/" + str(r.item_id): r.quarantine_reason for r in flagged.where("quarantine_reason is not null").collect()}
        assert reasons == {
            "e9/i1": "null_id", "e10/i3": "unknown_event_type", "e11/i3": "timestamp_outside_window",
            "e3/i2": "conflicting_event_id", "e3/i9": "conflicting_event_id", "e12/i3": "invalid_value",
        }
        assert flagged.where("quarantine_reason is null").count() == len(ALICE_BOB) - 1  # the original e3 went too


def test_only_rows_with_a_repeated_event_id_are_compared_by_content_and_every_path_agrees(spark, monkeypatch):
    rows = ALICE_BOB + [
        ALICE_BOB[0],  # e1 twice: exact duplicate
        event("e3", "alice", "i9", "click", ts(1, 10)),  # e3 again, other content: conflict
        event(None, "bob", "i1", "view", ts(2)), event(None, "bob", "i1", "view", ts(2)),  # a null id, twice
        event(None, "bob", "i2", "view", ts(2)),  # a null id, other content: never a conflict
    ]
    events = frame(spark, rows)
    # Repeated: e1, e3 and the null id (nulls share one hash); e2, e4.. are distinct as read.
    assert rules.repeated_id_hashes(rules.with_id_hash(events)).count() == 3

    def distinct_rows(repeated_max=rules.BROADCAST_CONFLICTS_MAX):
        flagged, count = cleaning.flag_distinct_events(events, dt.date(2024, 1, 1), DS, repeated_max)
        collected = sorted(tuple(str(v) for v in r) for r in flagged.collect())
        assert len(collected) == count
        return collected

    by_hash = distinct_rows()
    assert len(by_hash) == len(rows) - 2  # e1's and the null id's exact copies dropped
    reasons = {(r[0], r[2], r[7], r[8]) for r in by_hash if r[8] != "None"}
    assert reasons == {("e3", "i2", "2", "conflicting_event_id"), ("e3", "i9", "2", "conflicting_event_id"),
                       ("None", "i1", "1", "null_id"), ("None", "i2", "1", "null_id")}
    assert distinct_rows(repeated_max=0) == by_hash  # too many repeated hashes: every event compared by content
    # A hash shared by two ids (a collision) only sends more rows to the comparison by content.
    monkeypatch.setattr(cleaning, "repeated_id_hashes", lambda hashed: hashed.groupBy(rules.ID_HASH).agg(F.count(F.lit(1)).alias("_rows")))
    assert distinct_rows() == by_hash


def test_a_conflicting_copy_that_breaks_an_earlier_rule_keeps_that_rule(spark):
    # e1 again with a null user: that copy is null_id (rule 1), the valid original conflicting_event_id (rule 7).
    rows = ALICE_BOB + [event("e1", None, "i1", "view", ts(1, 8))]
    reasons = {(r.user_id, r.event_id_copies, r.quarantine_reason) for r in flag(rules.deduplicate_events(frame(spark, rows))).where("event_id = 'e1'").collect()}
    assert reasons == {(None, 2, "null_id"), ("alice", 2, "conflicting_event_id")}


def test_blank_ids_and_non_finite_values_are_quarantined(spark):
    rows = ALICE_BOB + [
        event("b1", "", "i1", "view", ts(2)),  # empty user_id
        event("b2", "bob", " \t", "view", ts(2)),  # whitespace-only item_id
        event("\u00a0", "bob", "i1", "view", ts(2)),  # a no-break space is whitespace too
        event("b3", " bob", "\u3000i1", "view", ts(2)),  # ids that start with whitespace, not blank: valid
        event("v1", "bob", "i1", "rate", ts(2), value=float("inf")),
        event("v2", "bob", "i1", "rate", ts(2), value=float("-inf")),
        event("v3", "bob", "i1", "rate", ts(2), value=float("nan")),
    ]
    flagged = flag(rules.deduplicate_events(frame(spark, rows)))
    reasons = {r.event_id: r.quarantine_reason for r in flagged.where("quarantine_reason is not null").collect()}
    assert reasons == {"b1": "blank_id", "b2": "blank_id", "\u00a0": "blank_id",
                       "v1": "non_finite_value", "v2": "non_finite_value", "v3": "non_finite_value"}


def read_sorted(path):
    table = pq.read_table(path)
    table = table.cast(pa.schema([pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type) for f in table.schema]))
    return table.sort_by([(c, "ascending") for c in table.column_names if c not in ("history_item_ids", "history_item_idx", "categories")])


def test_run_writes_validated_features_atomically_and_reruns_identically(spark, tmp_path):
    bad = [event("bad", "bob", "i3", "like", ts(2)), event("blank", " ", "i3", "view", ts(2))]
    raw = write_raw(tmp_path / "raw", ALICE_BOB + [ALICE_BOB[0]] + bad, ITEMS)
    # Side tables re-sent with changes: a later file's row replaces an earlier one, and so does a later row.
    write_table(pa.Table.from_pylist([dict(item_id="i1", title="old", year=1990, categories=["x"]), dict(item_id="i1", title="new", year=1991, categories=["y"])],
                                     schema=ITEM_SCHEMA), raw / "items" / "update.parquet")  # sorts after items.parquet
    write_table(pa.Table.from_pylist([dict(user_id=u, age=a, gender="F", occupation="engineer") for u, a in [("alice", 20), ("bob", 21), ("bob", 50)]],
                                     schema=USER_SCHEMA), raw / "users" / "users.parquet")
    cfg = dataclasses.replace(CFG, max_quarantine_share=0.2)  # 2 of 10 events are quarantined
    first = job.run(spark, raw, tmp_path / "out", DS, cfg)
    out = tmp_path / "out" / f"ds={DS}"
    assert sorted(p.name for p in out.iterdir()) == sorted(["interactions", "user_features", "item_features", "user_vocab", "item_vocab", "quarantine", "manifest.json"])
    assert first["counts"]["exact_duplicates"] == 1
    assert first["counts"]["quarantined_by_reason"] == {"blank_id": 1, "unknown_event_type": 1}
    # i1 three times (items.parquet, then twice in update.parquet): 2 dropped; bob twice: 1 dropped.
    assert (first["counts"]["duplicate_item_ids"], first["counts"]["duplicate_user_ids"]) == (2, 1)
    assert {r["item_id"]: r["year"] for r in pq.read_table(out / "item_features").to_pylist()}["i1"] == 1991
    assert {r["user_id"]: r["age"] for r in pq.read_table(out / "user_features").to_pylist()}["bob"] == 50
    assert first["counts"]["interactions_by_split"] == {"train": 5, "validation": 1, "test": 1}
    assert first["input_partitions"] == ["ds=2024-01-01", "ds=2024-01-02", "ds=2024-01-03"]
    assert json.loads((out / "manifest.json").read_text()) == first
    assert (tmp_path / "out" / "_validation" / f"ds={DS}" / "features" / "index.html").exists()
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []  # no temp dirs left

    tables = {n: read_sorted(out / n) for n in ("interactions", "user_features", "item_features", "quarantine")}
    second = job.run(spark, raw, tmp_path / "out", DS, cfg, validate_data=False)
    second.pop("validation"), first.pop("validation")
    assert second == first
    for name, table in tables.items():
        assert read_sorted(out / name).equals(table), name


def test_window_reads_only_its_partitions(spark, tmp_path):
    old = event("old", "alice", "i6", "view", ts(1))
    # An event stamped Jan 1 but stored in partition ds=2023-12-31 is outside the window's partitions.
    raw = write_raw(tmp_path / "raw", ALICE_BOB + [old], ITEMS, partition_of=lambda e: dt.date(2023, 12, 31) if e["event_id"] == "old" else e["event_ts"].date())
    inputs = job.read_raw(spark, raw, dt.date(2024, 1, 1), DS)
    assert [p.name for p in inputs.partitions] == ["ds=2024-01-01", "ds=2024-01-02", "ds=2024-01-03"]
    assert inputs.events.where("event_id = 'old'").count() == 0


def test_job_reads_exactly_the_files_the_preflight_checks(spark, tmp_path):
    raw = write_raw(tmp_path / "raw", ALICE_BOB, ITEMS)
    day = event_partition_dir(raw, dt.date(2024, 1, 2))
    (day / "_SUCCESS").write_bytes(b"")
    (day / ".part-00000.parquet.crc").write_bytes(b"crc")
    shutil.copy(day / "part-00000.parquet", day / "_rewrite-in-progress.parquet")  # hidden: Spark skips it
    assert check_raw_window(raw, dt.date(2024, 1, 1), DS, 1) == {"partitions": 3, "files": 3, "rows": len(ALICE_BOB)}
    inputs = job.read_raw(spark, raw, dt.date(2024, 1, 1), DS)
    assert inputs.events.count() == len(ALICE_BOB) and len(inputs.files) == 3
    # A file Spark would read but the contract does not name: both refuse it, naming it.
    shutil.copy(day / "part-00000.parquet", day / "part-00001.pq")
    for check in (lambda: check_raw_window(raw, dt.date(2024, 1, 1), DS, 1), lambda: job.read_raw(spark, raw, dt.date(2024, 1, 1), DS)):
        with pytest.raises(RawWindowError, match=re.escape(str(day / "part-00001.pq")) + r": not a \.parquet file"):
            check()


def test_job_runs_on_a_window_with_a_file_without_rows(spark, tmp_path):
    import pandas as pd

    raw = write_raw(tmp_path / "raw", ALICE_BOB, ITEMS)
    # Empty frames as pandas writes them: every column of Parquet's null type, which Spark on
    # its own reads as int and cannot merge with the other files' strings.
    empty = lambda schema: pd.DataFrame({c: pd.Series([], dtype=object) for c in schema.names})  # noqa: E731
    empty(EVENT_SCHEMA).to_parquet(event_partition_dir(raw, dt.date(2024, 1, 2)) / "part-00001.parquet")
    empty(ITEM_SCHEMA).to_parquet(raw / "items" / "update.parquet")
    assert check_raw_window(raw, dt.date(2024, 1, 1), DS, 1) == {"partitions": 3, "files": 3, "rows": len(ALICE_BOB)}
    manifest = job.run(spark, raw, tmp_path / "out", DS, CFG, validate_data=False)
    assert manifest["input_files"] == [f"ds=2024-01-0{day}/part-00000.parquet" for day in (1, 2, 3)]  # the empty file is not read
    assert manifest["counts"]["raw_events"] == len(ALICE_BOB)
    assert manifest["counts"]["interactions_by_split"] == {"train": 5, "validation": 1, "test": 1}


def test_job_reads_a_column_spelled_in_capitals_as_the_preflight_accepts_it(spark, tmp_path):
    raw = write_raw(tmp_path / "raw", ALICE_BOB, ITEMS)
    path = event_partition_dir(raw, dt.date(2024, 1, 2)) / "part-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.rename_columns([c.upper() if c == "user_id" else c for c in table.column_names]), path)
    assert check_raw_window(raw, dt.date(2024, 1, 1), DS, 1)["rows"] == len(ALICE_BOB)
    # Spark matches names case-insensitively (spark.sql.caseSensitive=false): USER_ID is user_id.
    users = {r.event_id: r.user_id for r in job.read_raw(spark, raw, dt.date(2024, 1, 1), DS).events.collect()}
    assert users == {e["event_id"]: e["user_id"] for e in ALICE_BOB}


def test_columns_spark_cannot_tell_apart_by_case_fail_the_job_naming_both(spark, tmp_path):
    raw = write_raw(tmp_path / "raw", ALICE_BOB, ITEMS)
    path = event_partition_dir(raw, dt.date(2024, 1, 2)) / "part-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.append_column("USER_ID", table.column("user_id")), path)
    run_fails(spark, tmp_path, raw, re.escape(str(path)) + r": has columns \['user_id', 'USER_ID'\] that Spark reads as one, user_id")


def test_timestamps_in_any_utc_unit_are_read_as_instants(spark, tmp_path):
    import pandas as pd

    on_day = lambda day: [e for e in ALICE_BOB if e["event_ts"].day == day]  # noqa: E731
    raw = write_raw(tmp_path / "raw", on_day(3), ITEMS)  # day 3: microseconds, as this project writes
    # Day 1 as pandas writes it: nanoseconds, and the all-None session_id stored as Parquet's null type.
    pandas_day = pd.DataFrame(on_day(1))
    pandas_day["event_ts"] += pd.to_timedelta([1500, 0, 0], unit="ns")  # e1 at 08:00 plus 1.5 microseconds
    event_partition_dir(raw, dt.date(2024, 1, 1)).mkdir()
    pandas_day.to_parquet(event_partition_dir(raw, dt.date(2024, 1, 1)) / "part-00000.parquet", index=False)
    # Day 2: milliseconds, large strings, value and session_id all null (null-typed).
    millis = pa.schema([f.with_type(pa.timestamp("ms", tz="UTC")) if f.name == "event_ts" else
                        f.with_type(pa.null()) if f.nullable else f.with_type(pa.large_string()) for f in EVENT_SCHEMA])
    write_table(pa.Table.from_pylist(on_day(2), schema=millis), event_partition_dir(raw, dt.date(2024, 1, 2)) / "part-00000.parquet")

    assert check_raw_window(raw, dt.date(2024, 1, 1), DS, 1)["rows"] == len(ALICE_BOB)
    inputs = job.read_raw(spark, raw, dt.date(2024, 1, 1), DS)
    micros = {r.event_id: (r.us, r.value, r.session_id) for r in inputs.events.select("event_id", F.unix_micros("event_ts").alias("us"), "value", "session_id").collect()}
    expected = {e["event_id"]: (int(e["event_ts"].timestamp()) * 1_000_000, e["value"], None) for e in ALICE_BOB}
    expected["e1"] = (expected["e1"][0] + 1, None, None)  # 1500 ns floors to 1 microsecond, Spark's precision
    assert micros == expected
    assert dict(inputs.events.dtypes) == {"event_id": "string", "user_id": "string", "item_id": "string", "event_type": "string",
                                          "event_ts": "timestamp", "value": "double", "session_id": "string"}


def test_naive_timestamps_fail_the_job_naming_file_and_column(spark, tmp_path):
    import pandas as pd

    raw = write_raw(tmp_path / "raw", ALICE_BOB, ITEMS)
    bad = event_partition_dir(raw, dt.date(2024, 1, 2)) / "part-00000.parquet"
    naive = pd.DataFrame([e for e in ALICE_BOB if e["event_ts"].day == 2])
    naive.assign(event_ts=naive["event_ts"].dt.tz_localize(None)).to_parquet(bad, index=False)
    run_fails(spark, tmp_path, raw, re.escape(str(bad)) + r": event_ts .*without a time zone")


def test_duplicate_side_table_ids_keep_the_last_row(spark, tmp_path):
    raw = write_raw(tmp_path / "raw", ALICE_BOB, ["i1", "i2"])
    write_table(pa.Table.from_pylist([dict(item_id="i1", title="a", year=2010, categories=[]), dict(item_id="i1", title="b", year=2011, categories=[])],
                                     schema=ITEM_SCHEMA), raw / "items" / "update.parquet")
    # In file order: i2 (2001) in items.parquet, then i1 twice in update.parquet (2010, 2011).
    write_table(pa.Table.from_pylist([dict(user_id=u, age=a, gender=None, occupation=None) for u, a in [("bob", 40), ("alice", 30), ("bob", 41)]],
                                     schema=USER_SCHEMA), raw / "users" / "users.parquet")
    inputs = job.read_raw(spark, raw, dt.date(2024, 1, 1), DS)
    assert {r.item_id: r.year for r in inputs.items.collect()} == {"i1": 2011, "i2": 2001}
    assert {r.user_id: r.age for r in inputs.users.collect()} == {"alice": 30, "bob": 41}
    assert inputs.duplicate_ids == {"items": 2, "users": 1}


def run_fails(spark, tmp_path, raw, match, cfg=CFG, error=RawWindowError):
    with pytest.raises(error, match=match):
        job.run(spark, raw, tmp_path / "out", DS, cfg)
    assert not (tmp_path / "out" / f"ds={DS}").exists()
    assert not [p for p in (tmp_path / "out").glob(".tmp-*")] if (tmp_path / "out").exists() else True


def test_missing_column_fails_with_no_output(spark, tmp_path):
    raw = tmp_path / "raw"
    spark.createDataFrame([("e1", "u", "i", ts(2))], "event_id string, user_id string, item_id string, event_ts timestamp").write.parquet(str(raw / "events" / "ds=2024-01-02"))
    run_fails(spark, tmp_path, raw, r"lacks column\(s\) \['event_type', 'value', 'session_id'\]")


def test_wrong_type_fails_with_no_output(spark, tmp_path):
    raw = tmp_path / "raw"
    spark.createDataFrame([("e1", "u", "i", "view", "2024-01-02", None, None)], job_schema().replace("event_ts timestamp", "event_ts string")).write.parquet(str(raw / "events" / "ds=2024-01-02"))
    run_fails(spark, tmp_path, raw, r"event_ts is string, expected timestamp")


def test_empty_window_fails_with_no_output(spark, tmp_path):
    raw = write_raw(tmp_path / "raw", [event("e1", "u", "i", "view", ts(20))], ["i"])
    run_fails(spark, tmp_path, raw, r"empty window: no event partitions ds=2024-01-01..ds=2024-01-03")


def test_corrupt_parquet_fails_with_no_output(spark, tmp_path):
    raw = write_raw(tmp_path / "raw", ALICE_BOB, ITEMS)
    (raw / "events" / "ds=2024-01-02" / "part-00001.parquet").write_bytes(b"PAR1 this is not parquet")
    run_fails(spark, tmp_path, raw, r"corrupt Parquet file .*ds=2024-01-02/part-00001.parquet")


def test_spark_read_failure_names_the_file(spark, tmp_path):
    raw = write_raw(tmp_path / "raw", ALICE_BOB, ITEMS)
    path = event_partition_dir(raw, dt.date(2024, 1, 2)) / "part-00000.parquet"
    # Smash the first page header but keep the footer: the pre-flight reads only footers, Spark fails mid-read.
    pq.write_table(pq.read_table(path), path, compression="NONE")
    data = bytearray(path.read_bytes())
    data[4:40] = b"\xff" * 36
    path.write_bytes(bytes(data))
    with pytest.raises(RawWindowError) as caught:
        job.run(spark, raw, tmp_path / "out", DS, CFG, validate_data=False)
    message = str(caught.value)
    assert str(path) in message and "An error occurred while calling" not in message
    assert not (tmp_path / "out" / f"ds={DS}").exists()


def test_spark_errors_are_read_for_file_column_and_rule(spark, tmp_path):
    from pipeline.spark import spark_failure

    path = tmp_path / "value.parquet"
    pq.write_table(pa.table({"value": pa.array([1], pa.int64())}), path)
    with pytest.raises(Exception) as caught:  # Py4J's message names only "o123.collectToPython"
        spark.read.schema("value double").parquet(str(path)).collect()
    failure = spark_failure(caught.value)
    assert (failure.file, failure.column) == (str(path), "value")
    assert "Expected Spark type double, actual Parquet type INT64" in failure.rule


def test_blank_ids_count_towards_the_quarantine_limit(spark, tmp_path):
    # 8 good + 1 blank user_id + 1 infinite value = 2 of 10 quarantined (20%) > 10%.
    rows = ALICE_BOB + [event("b1", "", "i1", "view", ts(2)), event("v1", "bob", "i1", "rate", ts(2), value=float("inf"))]
    raw = write_raw(tmp_path / "raw", rows, ITEMS)
    with pytest.raises(RawWindowError, match=r"quarantined share 20.00% \(2 of 10 events.*blank_id.*non_finite_value"):
        job.run(spark, raw, tmp_path / "out", DS, dataclasses.replace(CFG, max_quarantine_share=0.1), validate_data=False)


def test_bad_ds_is_rejected():
    for text in ("2024-13-01", "yesterday", "20240101", ""):
        with pytest.raises(ConfigError, match="ds must be a date YYYY-MM-DD"):
            parse_ds(text)
    assert job.main(["--raw", "r", "--out", "o", "--ds", "2024-02-30"]) == 2


def test_the_job_writes_to_exactly_one_of_out_and_data_root(capsys):
    for args, error in [(["--raw", "r"], "one of the arguments --out --data-root is required"),
                        (["--raw", "r", "--out", "o", "--data-root", "d"], "not allowed with argument"),
                        (["--out", "o"], "--raw is required with --out")]:
        with pytest.raises(SystemExit) as exited:
            job.main([*args, "--ds", "2024-01-03"])
        assert exited.value.code == 2 and error in capsys.readouterr().err


def test_data_root_publishes_the_features_where_the_pipeline_looks_for_this_run(spark, tmp_path, capsys):
    from pipeline.catalog import Catalog
    from pipeline.config import load_config

    root = tmp_path / "data"
    write_raw(root / "raw", ALICE_BOB, ITEMS)
    settings = {"features": {"history_length": 2, "shuffle_partitions": 2}}
    compressed = spark.conf.get("spark.sql.inMemoryColumnarStorage.compressed")
    try:
        assert job.main(["--data-root", str(root), "--ds", str(DS), "--window-days", "3",
                         "--config-json", json.dumps(settings), "--no-validation"]) == 0
    finally:  # main() configured the shared session as its own: set it back
        spark.conf.set("spark.sql.inMemoryColumnarStorage.compressed", compressed)
        spark.sparkContext.setLogLevel("ERROR")
    assert spark.range(3).count() == 3  # a session main() did not start is left running
    settings["features"]["window_days"] = 3  # what --window-days set
    published = Catalog(root).for_run(str(DS), load_config(settings)).features(str(DS))
    manifest = json.loads((published / "manifest.json").read_text())
    assert published.parent.parent == root / "features"  # features/<features version>/ds=<ds>
    assert manifest["counts"]["interactions_by_split"] == {"train": 5, "validation": 1, "test": 1}  # alice 3+1+1, bob 2 train-only
    assert manifest["config"]["window_days"] == 3
    assert json.loads(capsys.readouterr().out)["counts"] == manifest["counts"]


def test_quarantine_past_limit_fails_the_run(spark, tmp_path):
    # 8 good + 1 null user + 1 unknown type = 2 of 10 quarantined (20%) > 10%.
    rows = ALICE_BOB + [event("n1", None, "i1", "view", ts(2)), event("n2", "bob", "i1", "like", ts(2))]
    raw = write_raw(tmp_path / "raw", rows, ITEMS)
    run_fails(spark, tmp_path, raw, r"quarantined share 20.00% \(2 of 10 events.*null_id.*unknown_event_type.*exceeds features.max_quarantine_share=10.00%",
              cfg=dataclasses.replace(CFG, max_quarantine_share=0.1))
    kept = pq.read_table(tmp_path / "out" / "_validation" / f"ds={DS}" / "quarantine")
    assert sorted(kept.column("event_id").to_pylist()) == ["n1", "n2"]
    assert kept.column_names == [*EVENT_SCHEMA.names, "quarantine_reason"]  # as read, with the reason: nothing the job added


def test_gx_feature_suite_rejects_a_repeated_user_item_pair(tmp_path):
    import pandas as pd

    from spark_jobs.validation import feature_suites, validate, with_pair_key

    # alice/i1 twice (the rows the job writes per pair, as if a join had doubled one).
    rows = [("alice", "i1", 1, 1), ("alice", "i1", 1, 1), ("bob", "i2", 2, 2)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "user_idx", "item_idx"]).assign(
        split="train", weight=1.0, first_ts=pd.Timestamp("2024-01-01", tz="UTC"))
    with pytest.raises(DataValidationError) as caught:
        validate({"interactions": with_pair_key(frame)}, {"interactions": feature_suites()["interactions"]}, tmp_path / "docs")
    # The examples name the pair, not its packed key.
    assert "interactions: expect_column_values_to_be_unique(pair_key): 2 of 3 rows unexpected (66.67%), e.g. [(1, 1), (1, 1)]" in str(caught.value)
    assert (tmp_path / "docs" / "index.html").exists()  # the docs are built for a failing night too


def test_pair_key_packs_user_and_item_the_same_on_spark_and_pandas(spark):
    import pandas as pd

    from spark_jobs.validation import with_pair_key

    rows = [(1, 2), (2, 1), (3, 2**31 - 1)]
    on_spark = [r.pair_key for r in with_pair_key(spark.createDataFrame(rows, "user_idx int, item_idx int")).collect()]
    on_pandas = with_pair_key(pd.DataFrame(rows, columns=["user_idx", "item_idx"]))["pair_key"].tolist()
    assert on_spark == on_pandas == [2**32 + 2, 2 * 2**32 + 1, 3 * 2**32 + 2**31 - 1]  # distinct where a sum would repeat


def test_gx_raw_suite_names_expectation_column_and_count(spark, tmp_path):
    # 3 of 11 rows (27%) with a null user_id: above the 1% GX tolerance.
    rows = ALICE_BOB + [event(f"n{k}", None, "i1", "view", ts(2)) for k in range(3)]
    raw = write_raw(tmp_path / "raw", rows, ITEMS)
    with pytest.raises(DataValidationError) as caught:
        job.run(spark, raw, tmp_path / "out", DS, CFG)
    message = str(caught.value)
    assert "raw_events: expect_column_values_to_not_be_null(user_id): 3 of 11 rows unexpected" in message
    assert (tmp_path / "out" / "_validation" / f"ds={DS}" / "raw" / "index.html").exists()
    assert not (tmp_path / "out" / f"ds={DS}").exists()


def test_gx_raw_suite_checks_blank_ids_on_their_flags(spark, tmp_path):
    # Blank item_ids on 3 of 13 rows (23%), above the 1% tolerance; " i1" starts with a space
    # but is not blank, and the null item_id is rule null_id's, so neither counts here.
    rows = ALICE_BOB + [event("n1", "bob", None, "view", ts(2)), event("s1", "bob", " i1", "view", ts(2))] + [
        event(f"b{k}", "bob", blank, "view", ts(2)) for k, blank in enumerate(["", " \t", "\u3000"])]
    raw = write_raw(tmp_path / "raw", rows, ITEMS)
    with pytest.raises(DataValidationError) as caught:
        job.run(spark, raw, tmp_path / "out", DS, CFG)
    message = str(caught.value)
    assert "raw_events: expect_column_values_to_be_in_set(item_id_is_blank): 3 of 13 rows unexpected" in message
    assert "(user_id_is_blank)" not in message and "(event_id_is_blank)" not in message
    assert not (tmp_path / "out" / f"ds={DS}").exists()


def test_blank_id_flags_are_null_for_a_null_id(spark):
    rows = [event("e1", " ", "i1", "view", ts(1)), event("e2", None, "\u2003 ", "view", ts(1)), event("e3", "bob", "i1", "view", ts(1))]
    flags = {r.event_id: (r.user_id_is_blank, r.item_id_is_blank) for r in rules.with_blank_id_flags(frame(spark, rows)).collect()}
    assert flags == {"e1": (True, False), "e2": (None, True), "e3": (False, False)}


def test_gx_raw_suite_checks_conflicting_event_ids_on_the_copies_count_with_examples(spark, tmp_path):
    # e1 and e2 sent again with other content: 4 of 10 distinct events share an event_id.
    rows = ALICE_BOB + [event("e1", "alice", "i6", "view", ts(1, 8)), event("e2", "bob", "i1", "purchase", ts(1, 9), value=3.0)]
    raw = write_raw(tmp_path / "raw", rows, ITEMS)
    with pytest.raises(DataValidationError) as caught:
        job.run(spark, raw, tmp_path / "out", DS, CFG)
    # The passing-night pass computes counts only; the failing table is validated again for examples.
    assert "raw_events: expect_column_values_to_be_between(event_id_copies): 4 of 10 rows unexpected (40.00%), e.g. [2, 2, 2, 2]" in str(caught.value)
    assert not (tmp_path / "out" / f"ds={DS}").exists()


def test_window_bounds_do_not_depend_on_the_driver_time_zone(spark, monkeypatch):
    import time as time_module

    # 01:00 UTC on the window's first day: inside the window whatever the driver's local zone.
    early = [event("early", "alice", "i1", "view", ts(1, 1))]
    monkeypatch.setenv("TZ", "America/New_York")
    time_module.tzset()
    try:
        flagged = flag(rules.deduplicate_events(frame(spark, early)))
        assert flagged.first().quarantine_reason is None
    finally:
        monkeypatch.undo()
        time_module.tzset()


def test_a_bot_keeps_only_its_latest_interactions_and_the_manifest_counts_the_rest(spark, tmp_path):
    # The bot views b00..b29 once each, a minute apart on Jan 2, then hammers b29 (2,000 more views).
    bot = [event(f"bot{k}", "bot", f"b{k:02d}", "view", ts(2, 0, k)) for k in range(30)]
    bot += [event(f"hammer{k}", "bot", "b29", "view", ts(2, 1) + dt.timedelta(seconds=k)) for k in range(2_000)]
    raw = write_raw(tmp_path / "raw", ALICE_BOB + bot, ITEMS)
    cfg = dataclasses.replace(CFG, max_user_interactions=8)
    manifest = job.run(spark, raw, tmp_path / "out", DS, cfg)
    # 30 distinct items, the latest 8 kept (b22..b29): 22 dropped; alice (5) and bob (2) are under the cap.
    assert (manifest["counts"]["users_over_cap"], manifest["counts"]["interactions_over_cap"]) == (1, 22)
    out = tmp_path / "out" / f"ds={DS}"
    kept = pq.read_table(out / "interactions").to_pylist()
    bot_rows = {r["item_id"]: r["split"] for r in kept if r["user_id"] == "bot"}
    # Of 8 kept: test = max(1, floor(0.8)) = 1 (b29), validation = 1 (b28), train = 6.
    assert bot_rows == {**{f"b{k}": "train" for k in range(22, 28)}, "b28": "validation", "b29": "test"}
    assert manifest["counts"]["interactions_by_split"] == {"train": 5 + 6, "validation": 2, "test": 2}
    bot_features = [r for r in pq.read_table(out / "user_features").to_pylist() if r["user_id"] == "bot"][0]
    assert (bot_features["n_train"], bot_features["n_view"]) == (6, 6)  # the dropped items' events left no trace


def test_vocabulary_is_numbered_in_id_order_across_partitions(spark):
    ids = spark.createDataFrame([(f"u{k:03d}",) for k in range(200)] * 2, "user_id string").repartition(7)
    spark.conf.set("spark.sql.adaptive.coalescePartitions.enabled", "false")  # else AQE merges tiny partitions
    try:
        vocab = transforms.build_vocab(ids, "user_id", "user_idx")
        assert vocab.rdd.getNumPartitions() > 1  # numbered without gathering every id in one partition
        assert sorted((r.user_id, r.user_idx) for r in vocab.collect()) == [(f"u{k:03d}", k + 1) for k in range(200)]
    finally:
        spark.conf.unset("spark.sql.adaptive.coalescePartitions.enabled")
