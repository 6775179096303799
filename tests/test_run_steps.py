"""Run-level steps without Airflow: raw-window checks, feature checks, config errors."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.catalog import Catalog
from pipeline.config import ConfigError, load_config
from pipeline.data.contract import EVENT_SCHEMA, RawWindowError, event_partition_dir
from pipeline.data.raw_files import check_raw_window
from pipeline.steps.run import check_features
from tests.rawlogs import ALICE_BOB_EVENTS, event, ts, write_raw

START, END = dt.date(2024, 1, 1), dt.date(2024, 1, 3)


def test_raw_window_counts_rows_from_footers(tmp_path):
    raw = write_raw(tmp_path / "raw", ALICE_BOB_EVENTS)
    assert check_raw_window(raw, START, END, 1) == {"partitions": 3, "files": 3, "rows": len(ALICE_BOB_EVENTS)}


def test_raw_window_structural_faults_name_the_problem(tmp_path):
    with pytest.raises(RawWindowError, match=r"empty window: no event partitions ds=2024-01-01..ds=2024-01-03"):
        check_raw_window(tmp_path / "nothing", START, END, 1)
    raw = write_raw(tmp_path / "raw", [event("e1", "u", "i", "view", ts(2))])
    bad = raw / "events" / "ds=2024-01-02" / "part-00001.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(RawWindowError, match=r"corrupt Parquet file .*part-00001.parquet"):
        check_raw_window(raw, START, END, 1)
    bad.unlink()
    pq.write_table(pa.table({"event_id": ["e"], "user_id": ["u"]}), bad)
    with pytest.raises(RawWindowError, match=r"lacks column\(s\) \['item_id', 'event_type', 'event_ts', 'value', 'session_id'\]"):
        check_raw_window(raw, START, END, 1)
    table = pq.read_table(raw / "events" / "ds=2024-01-02" / "part-00000.parquet")
    pq.write_table(table.set_column(4, "event_ts", pa.array(["2024-01-02"])), bad)
    with pytest.raises(RawWindowError, match=r"event_ts is string, expected timestamp\[us, tz=UTC\]"):
        check_raw_window(raw, START, END, 1)
    bad.unlink()
    with pytest.raises(RawWindowError, match=r"1 event\(s\) in ds=2024-01-01..ds=2024-01-03, need >= 5"):
        check_raw_window(raw, START, END, 5)


def test_raw_window_skips_what_spark_skips(tmp_path):
    raw = write_raw(tmp_path / "raw", ALICE_BOB_EVENTS)
    day = event_partition_dir(raw, dt.date(2024, 1, 2))
    # Names starting with "_" or ".": writers' markers, checksums and unfinished files.
    for hidden in ("_SUCCESS", ".part-00000.parquet.crc", "_partial.parquet", ".inflight.parquet", "_temporary/0/part-00009.parquet"):
        (day / hidden).parent.mkdir(parents=True, exist_ok=True)
        (day / hidden).write_bytes(b"not parquet at all")
    assert check_raw_window(raw, START, END, 1) == {"partitions": 3, "files": 3, "rows": len(ALICE_BOB_EVENTS)}


@pytest.mark.parametrize("entry", ["part-00001.pq", "part-00001", "hour=01/part-00000.parquet"])
def test_raw_window_rejects_what_spark_would_read_unchecked(tmp_path, entry):
    raw = write_raw(tmp_path / "raw", ALICE_BOB_EVENTS)
    day = event_partition_dir(raw, dt.date(2024, 1, 2))
    (day / entry).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(day / "part-00000.parquet", day / entry)  # valid Parquet: only its name or place is wrong
    offender = day / entry.split("/")[0]
    with pytest.raises(RawWindowError, match=re.escape(str(offender)) + r": .*(not a \.parquet file|a sub-directory)"):
        check_raw_window(raw, START, END, 1)


def test_raw_window_accepts_what_a_pandas_producer_writes(tmp_path):
    import pandas as pd

    raw = write_raw(tmp_path / "raw", [e for e in ALICE_BOB_EVENTS if e["event_ts"].day != 2])
    # pandas' defaults: nanosecond timestamps, and an all-None column stored as Parquet's null type.
    frame = pd.DataFrame([e for e in ALICE_BOB_EVENTS if e["event_ts"].day == 2])
    event_partition_dir(raw, dt.date(2024, 1, 2)).mkdir()
    frame.to_parquet(event_partition_dir(raw, dt.date(2024, 1, 2)) / "part-00000.parquet", index=False)
    assert check_raw_window(raw, START, END, 1)["rows"] == len(ALICE_BOB_EVENTS)


def test_raw_window_rejects_timestamps_without_a_time_zone(tmp_path):
    import pandas as pd

    raw = write_raw(tmp_path / "raw", ALICE_BOB_EVENTS)
    bad = event_partition_dir(raw, dt.date(2024, 1, 2)) / "part-00000.parquet"
    frame = pd.DataFrame([e for e in ALICE_BOB_EVENTS if e["event_ts"].day == 2])
    frame.assign(event_ts=frame["event_ts"].dt.tz_localize(None)).to_parquet(bad, index=False)
    with pytest.raises(RawWindowError, match=re.escape(str(bad)) + r": event_ts .*without a time zone"):
        check_raw_window(raw, START, END, 1)


def test_raw_window_accepts_null_typed_columns_only_where_nullable(tmp_path):
    raw = write_raw(tmp_path / "raw", ALICE_BOB_EVENTS)
    path = event_partition_dir(raw, dt.date(2024, 1, 2)) / "part-00000.parquet"
    table = pq.read_table(path)
    rows = table.num_rows
    nullable = table.set_column(6, "session_id", pa.nulls(rows)).set_column(5, "value", pa.nulls(rows))
    strings = pa.schema([f.with_type(pa.large_string()) if f.type == pa.string() else f for f in nullable.schema])
    pq.write_table(nullable.cast(strings), path)
    assert check_raw_window(raw, START, END, 1)["rows"] == len(ALICE_BOB_EVENTS)
    pq.write_table(table.set_column(1, "user_id", pa.nulls(rows)), path)
    with pytest.raises(RawWindowError, match=re.escape(str(path)) + r": user_id is null-typed .*must hold values"):
        check_raw_window(raw, START, END, 1)
    pq.write_table(table.append_column("item_id", table.column("item_id")), path)
    with pytest.raises(RawWindowError, match=re.escape(str(path)) + r": has column\(s\) \['item_id'\] more than once"):
        check_raw_window(raw, START, END, 1)


def test_raw_window_accepts_a_file_without_rows_whatever_its_types(tmp_path):
    import pandas as pd

    raw = write_raw(tmp_path / "raw", ALICE_BOB_EVENTS)
    empty = event_partition_dir(raw, dt.date(2024, 1, 2)) / "part-00001.parquet"
    # pandas stores an empty object column as Parquet's null type, the ids included.
    pd.DataFrame({c: pd.Series([], dtype=object) for c in EVENT_SCHEMA.names}).to_parquet(empty)
    assert pq.read_schema(empty).field("item_id").type == pa.null()
    # Not read (no rows, nothing to read): 3 files, as the feature job reads them.
    assert check_raw_window(raw, START, END, 1) == {"partitions": 3, "files": 3, "rows": len(ALICE_BOB_EVENTS)}
    pd.DataFrame({c: pd.Series([], dtype=object) for c in EVENT_SCHEMA.names if c != "user_id"}).to_parquet(empty)
    with pytest.raises(RawWindowError, match=re.escape(str(empty)) + r": lacks column\(s\) \['user_id'\]"):
        check_raw_window(raw, START, END, 1)  # its column names are still the contract's


def test_raw_window_rejects_columns_spark_cannot_tell_apart_by_case(tmp_path):
    raw = write_raw(tmp_path / "raw", ALICE_BOB_EVENTS)
    path = event_partition_dir(raw, dt.date(2024, 1, 2)) / "part-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.append_column("USER_ID", table.column("user_id")), path)
    with pytest.raises(RawWindowError, match=re.escape(str(path)) + r": has columns \['user_id', 'USER_ID'\] that Spark reads as one, user_id"):
        check_raw_window(raw, START, END, 1)


def test_raw_window_matches_column_names_case_insensitively_as_spark_reads_them(tmp_path):
    raw = write_raw(tmp_path / "raw", ALICE_BOB_EVENTS)
    path = event_partition_dir(raw, dt.date(2024, 1, 2)) / "part-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.rename_columns([c.upper() if c == "user_id" else c for c in table.column_names]), path)
    assert check_raw_window(raw, START, END, 1)["rows"] == len(ALICE_BOB_EVENTS)  # Spark reads USER_ID as user_id
    pq.write_table(table.set_column(1, "USER_ID", pa.array([1] * table.num_rows)), path)
    with pytest.raises(RawWindowError, match=re.escape(str(path)) + r": USER_ID \(read as user_id\) is int64, expected string"):
        check_raw_window(raw, START, END, 1)  # and judges its type


def test_raw_window_checks_the_side_tables_too(tmp_path):
    raw = write_raw(tmp_path / "raw", ALICE_BOB_EVENTS, ["i1"], ["alice"])
    bad = raw / "items" / "items.parquet"
    pq.write_table(pa.table({"item_id": ["i1"], "title": ["t"], "year": ["MCMXCV"], "categories": [["a"]]}), bad)
    with pytest.raises(RawWindowError, match=re.escape(str(bad)) + r": year is string, expected int32"):
        check_raw_window(raw, START, END, 1)


def test_feature_check_requires_a_validated_manifest_with_every_split(tmp_path):
    catalog = Catalog(tmp_path)
    with pytest.raises(FileNotFoundError, match="manifest.json missing"):
        check_features(catalog, "2024-01-03")
    part = tmp_path / "features" / "ds=2024-01-03"
    part.mkdir(parents=True)
    manifest = {"ds": "2024-01-03", "config": {}, "validation": {"features": {"interactions": {"success": True}}},
                "counts": {"interactions_by_split": {"train": 5, "validation": 1, "test": 0}}, "tables": {}}
    (part / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"no interactions in split\(s\) \['test'\]"):
        check_features(catalog, "2024-01-03")
    manifest["validation"] = {}
    (part / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not validated by the GX feature suite"):
        check_features(catalog, "2024-01-03")


def test_config_errors_name_the_setting():
    assert cli.overrides(["distill.alpha=0.7", "student.embedding_dim=8", "gate.mode=absolute"]) == {
        "distill": {"alpha": 0.7}, "student": {"embedding_dim": 8}, "gate": {"mode": "absolute"}}
    cfg = load_config(cli.overrides(["student.embedding_dim=8"]))
    assert cfg.student.embedding_dim == 8 and cfg.student.hidden_units == (32,)  # other student defaults kept
    for bad, message in [
        ({"distill": {"bogus": 1}}, r"unknown setting\(s\) \['config.distill.bogus'\]"),
        ({"train": {"alpha": 0.5}}, r"unknown setting\(s\) \['config.train'\]"),
        ({"distill": {"alpha": "high"}}, "config.distill.alpha must be a number"),
        ({"distill": {"soft_loss": "mse"}}, "distill.soft_loss must be 'kl' or 'ranking'"),
        ({"features": {"window_days": 0}}, "features.window_days must be >= 1"),
        ({"features": {"event_weights": {"like": 1.0}}}, "unknown event types"),
        ({"gate": {"floors": {"mrr": 0.1}}}, "gate.floors names metrics that are not gated"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(bad)
    with pytest.raises(ConfigError, match="--set takes SECTION.KEY=VALUE"):
        cli.overrides(["alpha"])
