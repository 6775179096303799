"""Confinement: every path a step uses stays inside the data root once symlinks are followed.

Each test plants a symlink under the data root that points outside it and calls the step
that would use it: the step refuses, naming the link, where it resolves and the root. A
symlink that stays inside the root is accepted.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.catalog import Catalog, OutsideDataRoot, date_partition, validation_docs
from pipeline.config import load_config
from pipeline.records import ModelMetadata
from pipeline.data.contract import event_partition_dir
from pipeline.steps import run as run_module
from spark_jobs import extract_features as job
from tests.rawlogs import ALICE_BOB_EVENTS, write_raw
from tests.helpers import saved_model

DS = "2024-01-03"  # ALICE_BOB_EVENTS fall on Jan 1-3: a three-day window holds them all
AFTER = dt.datetime(2024, 1, 4, 2, 0, tzinfo=dt.timezone.utc)
EVALUATION = {"models": {"student_kd": {"ndcg@10": 0.3}, "teacher": {"ndcg@10": 0.31}}}
BLESSED = {"blessed": True, "decision": "BLESSED", "reasons": [], "warnings": [], "champion_version": None}


def refused(link: Path, target: Path, root: Path) -> str:
    """The error's text: the path used, where it resolves, the allowed root."""
    return re.escape(f"{link} resolves to {target.resolve()}, outside the data root {root.resolve()}")


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    """``$RECSYS_DATA_ROOT`` (``<tmp>/data``); ``<tmp>/elsewhere`` lies outside it."""
    monkeypatch.setenv("RECSYS_DATA_ROOT", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    return tmp_path / "data"


def resolved_run(**params) -> dict:
    return run_module.resolve_run({"ds": DS, "window_days": 3, **params}, AFTER, "manual")


def features_of(run: dict) -> Path:
    """Where the feature set of ``run`` lives (its version follows the raw files when it was resolved)."""
    return date_partition(run_module.settings(run)[1].features_home, DS)


def publish_features(directory: Path) -> Path:
    """A published, validated feature set (its manifest only) at ``directory``."""
    directory.mkdir(parents=True)
    manifest = {"ds": DS, "config": {}, "validation": {"features": {"interactions": {"success": True}}}, "tables": {},
                "counts": {"interactions_by_split": {"train": 5, "validation": 1, "test": 1}}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def model_dir(directory: Path) -> Path:
    """An exported model directory: ``metadata.json`` and a ``saved_model/``."""
    saved_model(directory, "saved_model")
    ModelMetadata(version=directory.name, ds=DS, role="student", config={}, config_hash="h", trainable_params=10,
                  metrics={}, best_epoch=1, history=[{"epoch": 1, "loss": 1.0}], seconds=1.0).save(directory)
    return directory


# ----------------------------------------------------------------------------- raw input


def test_raw_input_through_a_symlink_out_of_the_root_is_refused(data):
    outside = write_raw(data.parent / "elsewhere" / "raw", ALICE_BOB_EVENTS)
    (data / "raw").symlink_to(outside)
    with pytest.raises(OutsideDataRoot, match=refused(data / "raw", outside, data)):
        run_module.validate_raw(resolved_run())
    with pytest.raises(OutsideDataRoot, match=refused(data / "raw", outside, data)):
        run_module.spark_arguments(resolved_run())


def test_a_raw_partition_or_file_linked_out_of_the_root_is_refused(data):
    raw = write_raw(data / "raw", ALICE_BOB_EVENTS)
    day = event_partition_dir(raw, dt.date(2024, 1, 2))
    moved = day.rename(data.parent / "elsewhere" / day.name)
    day.symlink_to(moved)
    with pytest.raises(OutsideDataRoot, match=refused(day, moved, data)):
        run_module.validate_raw(resolved_run())
    # The feature job checks what it reads itself (it never reaches Spark here).
    with pytest.raises(OutsideDataRoot, match=refused(day, moved, data)):
        job.run(None, raw, data / "features", dt.date.fromisoformat(DS), load_config({"features": {"window_days": 3}}).features,
                allowed_root=data)
    day.unlink()
    day.mkdir()
    (day / "part-00000.parquet").symlink_to(moved / "part-00000.parquet")
    with pytest.raises(OutsideDataRoot, match=refused(day / "part-00000.parquet", moved / "part-00000.parquet", data)):
        run_module.validate_raw(resolved_run())


# ----------------------------------------------------------------------------- features


def test_features_linked_out_of_the_root_are_refused_to_readers_and_to_the_feature_job(data):
    run = resolved_run()
    partition = features_of(run)
    outside = publish_features(data.parent / "elsewhere" / partition.name)
    partition.parent.mkdir(parents=True)
    partition.symlink_to(outside)
    _, catalog, _ = run_module.settings(run)
    with pytest.raises(OutsideDataRoot, match=refused(partition, outside, data)):
        run_module.check_features(catalog, DS)
    write_raw(data / "raw", ALICE_BOB_EVENTS)
    home = partition.parent  # the feature job's --out
    with pytest.raises(OutsideDataRoot, match=refused(partition, outside, data)):
        job.run(None, data / "raw", home, dt.date.fromisoformat(DS), load_config().features, allowed_root=data)
    # Its validation docs too: the job would write GX Data Docs and quarantined rows there.
    partition.unlink()
    docs = validation_docs(home, DS)
    docs.parent.mkdir()
    docs.symlink_to(data.parent / "elsewhere")
    with pytest.raises(OutsideDataRoot, match=refused(docs, data.parent / "elsewhere", home)):
        job.run(None, data / "raw", home, dt.date.fromisoformat(DS), load_config().features)  # default: inside --out


def test_a_step_run_from_the_command_line_refuses_and_says_why(data, caplog):
    partition = date_partition(Catalog(data).for_run(DS, load_config()).features_home, DS)  # the step's default settings
    outside = publish_features(data.parent / "elsewhere" / partition.name)
    partition.parent.mkdir(parents=True)
    partition.symlink_to(outside)
    step = lambda ds, catalog, cfg: {"features": str(catalog.features(ds))}  # noqa: E731
    with caplog.at_level(logging.ERROR):
        assert cli.run_step(step, "read the features", ["--ds", DS, "--data-root", str(data)]) == 1
    assert re.search(refused(partition, outside, data), caplog.text)


# ----------------------------------------------------------------------------- models


def test_models_linked_out_of_the_root_are_refused(data):
    run = resolved_run()
    publish_features(features_of(run))
    (data / "models").symlink_to(data.parent / "elsewhere")
    _, catalog, cfg = run_module.settings(run)
    with pytest.raises(OutsideDataRoot, match=refused(data / "models", data.parent / "elsewhere", data)):
        catalog.teacher(DS, cfg)
    with pytest.raises(OutsideDataRoot, match=refused(data / "models", data.parent / "elsewhere", data)):
        catalog.student(DS, cfg)


def test_a_model_path_handed_over_by_an_upstream_task_is_checked_where_it_is_used(data):
    run = resolved_run()
    publish_features(features_of(run))
    teacher_dir = data / "models" / "teacher" / "t1"
    outside = model_dir(data.parent / "elsewhere" / "t1")
    teacher_dir.parent.mkdir(parents=True)
    teacher_dir.symlink_to(outside)  # swapped in after train_teacher returned its path
    student = {"path": str(model_dir(data / "models" / "student" / "s1")), "soft_targets": "st"}
    teacher = {"version": "t1", "path": str(teacher_dir)}
    with pytest.raises(OutsideDataRoot, match=refused(teacher_dir, outside, data)):
        run_module.write_run_report({**run, "run_id": "manual__1"}, teacher, student, EVALUATION, BLESSED, None)
    from pipeline.steps.evaluate import evaluate_run

    _, catalog, cfg = run_module.settings(run)
    with pytest.raises(OutsideDataRoot, match=refused(teacher_dir, outside, data)):
        evaluate_run(DS, catalog, cfg, {"teacher": teacher_dir}, baselines=False, latency=False)
    # A file of the SavedModel linked out would be copied into the registry by promotion.
    secret = data.parent / "elsewhere" / "secret"
    secret.write_text("not a model")
    (Path(student["path"]) / "saved_model" / "variables" / "variables.data").symlink_to(secret)
    with pytest.raises(OutsideDataRoot, match=refused(Path(student["path"]) / "saved_model" / "variables" / "variables.data",
                                                      secret, data)):
        run_module.promote({**run, "run_id": "manual__1"}, teacher, student, EVALUATION, BLESSED)


# ----------------------------------------------------------------------------- registry and reports


def test_a_registry_linked_out_of_the_root_is_refused(data):
    run = {**resolved_run(), "run_id": "manual__1"}
    publish_features(features_of(run))
    teacher = {"version": "t1", "path": str(model_dir(data / "models" / "teacher" / "t1"))}
    student = {"path": str(model_dir(data / "models" / "student" / "s1")), "soft_targets": "st"}
    elsewhere = data.parent / "elsewhere"
    (data / "registry").symlink_to(elsewhere)
    with pytest.raises(OutsideDataRoot, match=refused(data / "registry", elsewhere, data)):
        run_module.promote(run, teacher, student, EVALUATION, BLESSED)
    with pytest.raises(OutsideDataRoot, match=refused(data / "registry", elsewhere, data)):
        run_module.record_rejection(run, teacher, student, EVALUATION, {**BLESSED, "blessed": False})
    assert list(elsewhere.iterdir()) == []  # nothing was written there
    # One level down: the model's directory, then a published version.
    (data / "registry").unlink()
    (data / "registry").mkdir()
    (data / "registry" / "recsys_student").symlink_to(elsewhere)
    _, catalog, _ = run_module.settings(run)
    with pytest.raises(OutsideDataRoot, match=refused(data / "registry" / "recsys_student", elsewhere, data)):
        run_module.champion_dir(catalog)
    (data / "registry" / "recsys_student").unlink()
    assert run_module.promote(run, teacher, student, EVALUATION, BLESSED)["version"] == 1
    version = data / "registry" / "recsys_student" / "1"
    version.rename(elsewhere / "1")
    version.symlink_to(elsewhere / "1")
    with pytest.raises(OutsideDataRoot, match=refused(version, elsewhere / "1", data)):
        run_module.champion_dir(catalog)


def test_reports_linked_out_of_the_root_are_refused(data):
    run = {**resolved_run(), "run_id": "manual__1"}
    publish_features(features_of(run))
    teacher = {"version": "t1", "path": str(model_dir(data / "models" / "teacher" / "t1"))}
    student = {"path": str(model_dir(data / "models" / "student" / "s1"))}
    (data / "reports").symlink_to(data.parent / "elsewhere")
    with pytest.raises(OutsideDataRoot, match=refused(data / "reports", data.parent / "elsewhere", data)):
        run_module.write_run_report(run, teacher, student, EVALUATION, BLESSED, None)
    assert list((data.parent / "elsewhere").iterdir()) == []


# ----------------------------------------------------------------------------- links that stay inside


def test_symlinks_that_stay_inside_the_root_are_accepted(data, tmp_path):
    shared = write_raw(data / "shared" / "raw", ALICE_BOB_EVENTS)
    (data / "raw").symlink_to(shared)
    assert run_module.validate_raw(resolved_run()) == {"partitions": 3, "files": 3, "rows": len(ALICE_BOB_EVENTS)}
    # A run's data root below $RECSYS_DATA_ROOT may link to elsewhere in it, e.g. shared features.
    (data / "nightly").mkdir()
    (data / "nightly" / "features").symlink_to(data / "shared" / "features")
    nightly = resolved_run(data_root="nightly")
    version = nightly["features_version"]
    publish_features(date_partition(data / "shared" / "features" / version, DS))
    _, catalog, _ = run_module.settings(nightly)
    assert run_module.check_features(catalog, DS)["path"] == str(date_partition(data / "nightly" / "features" / version, DS))
    # The path handed out is the one asked for, not where it resolves: names (versions) keep their meaning.
    assert catalog.raw == data / "nightly" / "raw"
    # A data root that is itself reached through a symlink is fine.
    (tmp_path / "link").symlink_to(data)
    assert Catalog(tmp_path / "link").raw == tmp_path / "link" / "raw"


def test_a_symlink_loop_is_refused_with_its_path(data):
    (data / "raw").symlink_to(data / "raw")
    with pytest.raises(OutsideDataRoot, match=re.escape(f"{data / 'raw'} cannot be resolved inside the data root")):
        Catalog(data).raw
