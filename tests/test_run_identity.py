"""A run's feature set is its own: the features version (ds, the ``features`` settings and
the raw window's files) is fixed when the run is resolved, and every task of the run reads
and writes that feature set only."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest

from pipeline.catalog import ArtifactNotFound, date_partition
from pipeline.data.contract import RawWindowError
from pipeline.data.synthetic import generate_synthetic_logs
from pipeline.steps import run as run_module

DS = "2024-01-31"
DUE = dt.datetime(2024, 2, 1, 2, tzinfo=dt.timezone.utc)


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    generate_synthetic_logs(root / "raw", users=40, items=30, days=14, events=1_000, seed=3, end_date=DS)
    monkeypatch.setenv("RECSYS_DATA_ROOT", str(root))
    return root


def publish(run: dict, window_days: int) -> None:
    """What the feature job of ``run`` publishes (its manifest), under the ``--out`` the run gives it."""
    args = run_module.spark_arguments(run)
    final = date_partition(Path(args[args.index("--out") + 1]), DS)
    final.mkdir(parents=True)
    (final / "manifest.json").write_text(json.dumps({
        "ds": DS, "config": {}, "window_days": window_days, "validation": {"features": {"interactions": {"success": True}}},
        "counts": {"interactions_by_split": {"train": 5, "val": 1, "test": 1}}, "tables": {"interactions": {"rows": 7}}}))


def test_two_runs_of_one_ds_with_other_windows_never_share_features(data_root):
    week = run_module.resolve_run({"ds": DS, "window_days": 7}, DUE, "manual__week")
    month = run_module.resolve_run({"ds": DS, "window_days": 14}, DUE, "manual__month")
    assert week["features_version"] != month["features_version"]
    out = {name: run_module.spark_arguments(run) for name, run in (("week", week), ("month", month))}
    assert out["week"][out["week"].index("--out") + 1] != out["month"][out["month"].index("--out") + 1]

    publish(week, 7)
    # The 14-day run, its feature job not yet done (or cleared), does not pick up the 7-day features.
    _, month_catalog, _ = run_module.settings(month)
    with pytest.raises(ArtifactNotFound, match=month["features_version"]):
        run_module.check_features(month_catalog, DS)
    _, week_catalog, _ = run_module.settings(week)
    assert run_module.check_features(week_catalog, DS)["path"] == str(week_catalog.features(DS))

    publish(month, 14)
    assert json.loads((month_catalog.features(DS) / "manifest.json").read_text())["window_days"] == 14
    assert json.loads((week_catalog.features(DS) / "manifest.json").read_text())["window_days"] == 7
    # The same ds and settings over the same files resolve to the same feature set (a re-run).
    assert run_module.resolve_run({"ds": DS, "window_days": 7}, DUE, "manual__again")["features_version"] == week["features_version"]


def test_a_raw_window_rewritten_after_resolution_fails_validate_raw(data_root):
    run = run_module.resolve_run({"ds": DS, "window_days": 7}, DUE, "scheduled")
    assert run_module.validate_raw(run)["files"] >= 1
    late = sorted(date_partition(data_root / "raw" / "events", DS).glob("*.parquet"))[0]
    os.utime(late, ns=(late.stat().st_atime_ns, late.stat().st_mtime_ns + 1_000_000_000))  # a late rewrite of the day
    with pytest.raises(RawWindowError, match=rf"changed since this run was resolved \(features version {run['features_version']}"):
        run_module.validate_raw(run)
    assert run_module.resolve_run({"ds": DS, "window_days": 7}, DUE, "manual")["features_version"] != run["features_version"]
