"""TensorBoard logs of every training: per-epoch scalars published inside the model directory,
named in its metadata, equal to the history it records, and handed to the run report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tensorflow as tf

from pipeline.catalog import Catalog, date_partition
from pipeline.config import load_config
from pipeline.io import DEBRIS, write_json
from tests.helpers import write_hand_features

DS = "2024-01-31"
# Two epochs in the selection run whatever validation says (patience 2), in seconds.
TINY = load_config({
    "training": {"batch_size": 16, "patience": 2, "shuffle_buffer": 64, "early_stopping_k": 5},
    "teacher": {"embedding_dim": 4, "hidden_units": [4], "output_dim": 4, "epochs": 2},
    "serving": {"top_k": 5},
})


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """``tag -> {step: value}`` of every scalar in a TensorBoard run directory's event files."""
    found: dict[str, dict[int, float]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "scalars"
                found.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return found


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, dict]:
    """A 2-epoch tiny teacher trained and published by the real step: its directory and metadata."""
    from pipeline.steps.train_teacher import train_teacher

    catalog = Catalog(tmp_path_factory.mktemp("tensorboard") / "data")
    write_hand_features(date_partition(catalog.features_home, DS), DS)
    result = train_teacher(DS, catalog, TINY)
    path = Path(result["path"])
    return path, json.loads((path / "metadata.json").read_text())


def test_logs_are_published_inside_the_model_directory_and_named_relative_to_it(teacher):
    path, meta = teacher
    assert meta["tensorboard"] == "tensorboard"  # relative: two runs' metadata stay equal
    assert sorted(p.name for p in (path / meta["tensorboard"]).iterdir()) == ["refit", "selection"]
    assert not [p for p in path.parent.iterdir() if DEBRIS.match(p.name)]  # written in the published temporary dir


def test_selection_scalars_equal_the_metadata_history(teacher):
    path, meta = teacher
    logged = scalars(path / meta["tensorboard"] / "selection")
    assert len(meta["history"]) == TINY.teacher.epochs == 2
    for row in meta["history"]:
        for key in row.keys() - {"epoch"}:  # loss, val_score, seconds
            assert logged[key][row["epoch"]] == pytest.approx(row[key], rel=1e-6), key
    assert {"loss", "val_score", "seconds"} <= logged.keys()
    # Every validation metric of every epoch; the one early stopping watches is the history's val_score.
    assert {"validation/recall@5", "validation/recall@10", "validation/ndcg@10"} <= logged.keys()
    assert logged["validation/recall@5"] == {row["epoch"]: pytest.approx(row["val_score"], rel=1e-6) for row in meta["history"]}


def test_refit_scalars_equal_the_refit_history(teacher):
    path, meta = teacher
    logged = scalars(path / meta["tensorboard"] / "refit")
    history = meta["refit"]["history"]
    assert len(history) == meta["best_epoch"] >= 1
    assert logged.keys() == history[0].keys() - {"epoch"}  # no validation in the refit
    for row in history:
        for key in row.keys() - {"epoch"}:
            assert logged[key][row["epoch"]] == pytest.approx(row[key], rel=1e-6), key


def test_run_report_gets_each_models_absolute_log_directory(tmp_path, monkeypatch):
    from pipeline.steps import run as run_steps

    monkeypatch.setenv("RECSYS_DATA_ROOT", str(tmp_path))
    models = {}
    required = {"version": "v1", "ds": DS, "config": {}, "config_hash": "h", "trainable_params": 1, "metrics": {},
                "best_epoch": 1, "seconds": 1.0}
    for name, meta in (("teacher", {"history": [], "tensorboard": "tensorboard"}),
                       ("student", {"history": []})):  # exported before TensorBoard logs: nothing to link
        models[name] = {"path": str(tmp_path / "models" / name / "v1"), "version": "v1"}
        write_json(tmp_path / "models" / name / "v1" / "metadata.json", {**required, "role": name, **meta})
    captured = {}
    monkeypatch.setattr(run_steps, "write_report", lambda *args, **kwargs: captured.update(kwargs) or {"html": "report.html"})
    run = {"data_root": str(tmp_path), "ds": DS, "config": {}, "run_id": "manual-1", "run_key": "k", "config_hash": "h"}
    run_steps.write_run_report(run, models["teacher"], models["student"], {"models": {}}, {"decision": "BLESSED"}, None)
    assert captured["tensorboard"] == {"teacher": str(tmp_path / "models" / "teacher" / "v1" / "tensorboard")}
