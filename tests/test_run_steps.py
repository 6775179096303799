"""Run-level steps without Airflow: raw-window checks, feature checks, config errors."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.catalog import Catalog
from pipeline.config import ConfigError, load_config
from pipeline.data.contract import RawWindowError, check_raw_window
from pipeline.run import check_features
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


def test_feature_check_requires_a_validated_manifest_with_every_split(tmp_path):
    catalog = Catalog(tmp_path)
    with pytest.raises(FileNotFoundError, match="manifest.json missing"):
        check_features(catalog, "2024-01-03")
    part = tmp_path / "features" / "ds=2024-01-03"
    part.mkdir(parents=True)
    manifest = {"validation": {"features": {"interactions": {"success": True}}},
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
