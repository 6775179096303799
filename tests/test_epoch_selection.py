"""No leak in a student's epoch selection: its selection run, judged on validation, learns from
soft targets of the teacher's selection run (trained on train only), its refit from those of
the teacher refitted on train + validation; without a refit there is one set."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from pipeline.catalog import Catalog, date_partition
from pipeline.config import load_config
from pipeline.modeling.training import REFIT_RUN, SELECTION_RUN
from pipeline.records import ArtifactNotFound, ModelMetadata, SoftTargetManifest
from tests.helpers import write_hand_features

DS = "2024-01-31"
USERS, ITEMS, HISTORY_LENGTH = 10, 30, 3
# User u touches 5 train items among 1..20 (days 0-4), then validation item 21 + u % 5 (day 5)
# and test item 26 + u % 5 (day 6): no validation item is ever a train item, so a teacher that
# trained on train only never saw one.
SPLIT_OF_DAY = ["train"] * 5 + ["validation", "test"]
# K = 25 = 30 items - 5 train items: a row of the selection set holds every item its user has
# not trained on; a row of the main set (train and validation excluded) 24 of them, then padding 0.
TINY = load_config({
    "training": {"batch_size": 16, "patience": 2, "shuffle_buffer": 64, "early_stopping_k": 5},
    "teacher": {"embedding_dim": 4, "hidden_units": [4], "output_dim": 4, "epochs": 2},
    "student": {"embedding_dim": 4, "hidden_units": [4], "output_dim": 4, "epochs": 2, "max_param_share": None},
    "distill": {"sampled_negatives": 5, "ladder": []}, "soft_targets": {"top_k": 25}, "serving": {"top_k": 5},
})
NO_REFIT = dataclasses.replace(TINY, training=dataclasses.replace(TINY.training, refit=False))


def item_of(user: int, day: int) -> int:
    if SPLIT_OF_DAY[day] == "train":
        return (user + 3 * day) % 20 + 1  # 3 * day differs mod 20 for days 0-4: 5 distinct items
    return (21 if SPLIT_OF_DAY[day] == "validation" else 26) + user % 5


def teacher_and_soft_targets(root: Path, cfg) -> Catalog:
    """A catalogue under ``root`` with the hand-made features, the teacher of ``cfg`` and its soft targets."""
    from pipeline.steps.soft_targets import generate_soft_targets
    from pipeline.steps.train_teacher import train_teacher

    catalog = Catalog(root)
    write_hand_features(date_partition(catalog.features_home, DS), DS, USERS, ITEMS, HISTORY_LENGTH, item_of)
    train_teacher(DS, catalog, cfg)
    generate_soft_targets(DS, catalog, cfg)
    return catalog


@pytest.fixture(scope="module")
def refitted(tmp_path_factory) -> Catalog:
    return teacher_and_soft_targets(tmp_path_factory.mktemp("refitted") / "data", TINY)


@pytest.fixture(scope="module")
def never_refitted(tmp_path_factory) -> Catalog:
    return teacher_and_soft_targets(tmp_path_factory.mktemp("never_refitted") / "data", NO_REFIT)


@pytest.fixture(scope="module")
def student(refitted) -> dict:
    """The refitted teacher's student, trained by the real step with two spies: the soft-target
    file of every training dataset by its splits, and the teacher item table of every model built."""
    from pipeline.modeling import training
    from pipeline.steps import distill

    datasets, item_tables = {}, []
    real_dataset, real_model = training.interaction_dataset, distill.DistillationModel

    def dataset_spy(features_dir, split, batch_size, shuffle_buffer, seed, sequences=None, history_length=0, user_columns=None):
        datasets[tuple(split)] = user_columns.path
        return real_dataset(features_dir, split, batch_size, shuffle_buffer, seed, sequences, history_length, user_columns)

    class ModelSpy(real_model):
        def __init__(self, student, teacher_items, *args, **kwargs):
            item_tables.append(teacher_items.embedding)
            super().__init__(student, teacher_items, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "interaction_dataset", dataset_spy)
        patch.setattr(distill, "DistillationModel", ModelSpy)
        result = distill.distill_student(DS, refitted, TINY)
    return {"result": result, "datasets": datasets, "item_tables": item_tables}


def weights(checkpoint: Path) -> dict[str, np.ndarray]:
    """Every variable of a TensorFlow checkpoint (``<dir>/weights``) by its object path."""
    reader = tf.train.load_checkpoint(str(checkpoint / "weights"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.endswith("/.ATTRIBUTES/VARIABLE_VALUE") and "OPTIMIZER_SLOT" not in name
            and not name.startswith(("optimizer/", "save_counter/"))}


def rows(soft_targets_dir: Path) -> dict[int, tuple[set[int], int]]:
    """``user_idx -> (items with a finite teacher score, how many)`` of a set's ``users.parquet``."""
    table = pq.read_table(soft_targets_dir / "users.parquet")
    k = SoftTargetManifest.load(soft_targets_dir).k
    items = table.column("topk_item_idx").combine_chunks().flatten().to_numpy().reshape(-1, k)
    scores = table.column("topk_scores").combine_chunks().flatten().to_numpy().reshape(-1, k)
    return {int(u): (set(row[np.isfinite(s)].tolist()), int(np.isfinite(s).sum()))
            for u, row, s in zip(table.column("user_idx").to_pylist(), items, scores)}


def test_refitted_teacher_keeps_its_selection_run_weights_beside_the_refitted_ones(refitted):
    teacher = refitted.teacher(DS, TINY)
    assert ModelMetadata.load(teacher).selection_checkpoint == "checkpoint_selection"
    selection, refit = weights(teacher / "checkpoint_selection"), weights(teacher / "checkpoint")
    assert selection.keys() == refit.keys() and len(selection) > 4
    # Trained on other interactions: every weight moved elsewhere (the query MLP's bias too).
    assert [name for name in selection if np.array_equal(selection[name], refit[name])] == []


def test_selection_run_weights_are_those_of_a_teacher_that_never_saw_validation(refitted, never_refitted):
    # Same seed, same train split, same epochs: the teacher trained without a refit ends where
    # the refitted one's selection run did, bit for bit.
    selection = weights(refitted.teacher(DS, TINY) / "checkpoint_selection")
    never = weights(never_refitted.teacher(DS, NO_REFIT) / "checkpoint")
    assert selection.keys() == never.keys()
    assert all(np.array_equal(selection[name], never[name]) for name in selection)


def test_selection_set_is_the_one_a_teacher_that_never_saw_validation_writes(refitted, never_refitted):
    selection = refitted.selection_soft_targets(DS, TINY)
    never = never_refitted.soft_targets(DS, NO_REFIT)
    for name in ("users.parquet", "items.parquet"):
        assert pq.read_table(selection / name).equals(pq.read_table(never / name)), name


def test_selection_set_excludes_only_train_items_and_the_main_set_validation_ones_too(refitted):
    main, selection = refitted.soft_targets(DS, TINY), refitted.selection_soft_targets(DS, TINY)
    assert selection == main / "selection"
    every_item = set(range(1, ITEMS + 1))
    for user, (items, count) in rows(selection).items():
        train = {item_of(user, d) for d in range(5)}
        assert (items, count) == (every_item - train, 25)  # 30 - 5: its validation item is ranked with the rest
    for user, (items, count) in rows(main).items():
        known = {item_of(user, d) for d in range(6)}
        assert (items, count) == (every_item - known, 24)  # 30 - 5 - 1


def test_manifests_name_the_weights_that_scored_each_set(refitted):
    main = SoftTargetManifest.load(refitted.soft_targets(DS, TINY))
    selection = SoftTargetManifest.load(refitted.selection_soft_targets(DS, TINY))
    assert (main.teacher_weights, main.known_splits, main.selection_set) == ("checkpoint", ["train", "validation"], "selection")
    assert (selection.teacher_weights, selection.known_splits, selection.selection_set) == ("checkpoint_selection", ["train"], None)
    assert selection.teacher_version == main.teacher_version == refitted.teacher(DS, TINY).name
    assert (main.users, selection.users) == (USERS, USERS)  # every user has train interactions


def test_without_refit_there_is_one_set_and_no_selection_weights(never_refitted):
    teacher, main = never_refitted.teacher(DS, NO_REFIT), never_refitted.soft_targets(DS, NO_REFIT)
    assert ModelMetadata.load(teacher).selection_checkpoint is None
    assert not (teacher / "checkpoint_selection").exists()
    assert sorted(p.name for p in main.iterdir()) == ["items.parquet", "manifest.json", "users.parquet"]
    manifest = SoftTargetManifest.load(main)
    assert (manifest.teacher_weights, manifest.known_splits, manifest.selection_set) == ("checkpoint", ["train"], None)
    assert never_refitted.selection_soft_targets(DS, NO_REFIT) == main


def test_student_selection_run_reads_the_selection_set_and_its_refit_the_main_set(refitted, student):
    from pipeline.soft_targets.rows import read_teacher_items

    main, selection = refitted.soft_targets(DS, TINY), refitted.selection_soft_targets(DS, TINY)
    assert student["datasets"] == {("train",): selection / "users.parquet",
                                   ("train", "validation"): main / "users.parquet"}
    built_first, built_second = student["item_tables"]
    assert np.array_equal(built_first, read_teacher_items(selection, ITEMS + 1).embedding)
    assert np.array_equal(built_second, read_teacher_items(main, ITEMS + 1).embedding)
    assert not np.array_equal(built_first, built_second)


def test_student_metadata_names_the_soft_targets_of_each_phase(refitted, student):
    meta = ModelMetadata.load(student["result"]["path"])
    main = refitted.soft_targets(DS, TINY)
    assert meta.soft_targets_by_phase == {
        SELECTION_RUN: {"path": str(main / "selection"), "teacher_weights": "checkpoint_selection"},
        REFIT_RUN: {"path": str(main), "teacher_weights": "checkpoint"},
    }
    assert meta.soft_targets == str(main) and meta.teacher_version == refitted.teacher(DS, TINY).name


def test_refitted_student_keeps_its_selection_runs_weights(student):
    """Tomorrow's warm selection run starts from them: they trained on train only."""
    path = Path(student["result"]["path"])
    assert ModelMetadata.load(path).selection_checkpoint == "checkpoint_selection"
    selection, refit = weights(path / "checkpoint_selection"), weights(path / "checkpoint")
    assert selection.keys() == refit.keys()
    assert any(not np.array_equal(selection[name], refit[name]) for name in selection)


def test_student_without_refit_learns_from_the_one_set(never_refitted):
    from pipeline.steps.distill import distill_student

    meta = ModelMetadata.load(distill_student(DS, never_refitted, NO_REFIT)["path"])
    main = never_refitted.soft_targets(DS, NO_REFIT)
    assert meta.soft_targets_by_phase == {SELECTION_RUN: {"path": str(main), "teacher_weights": "checkpoint"}}
    assert meta.refit is None and meta.selection_checkpoint is None


def test_soft_targets_without_a_selection_set_are_refused(refitted, tmp_path):
    from pipeline.steps.distill import distill_student

    catalog = Catalog(tmp_path / "data")
    shutil.copytree(refitted.root, catalog.root)
    shutil.rmtree(catalog.selection_soft_targets(DS, TINY))  # as written before the selection sets were
    with pytest.raises(ArtifactNotFound, match=r"no soft targets at .*/selection \(manifest.json missing\)"):
        distill_student(DS, catalog, TINY)


def test_refitted_teacher_without_selection_weights_gets_no_selection_set_and_is_not_reused(refitted, tmp_path):
    from pipeline.steps.soft_targets import generate_soft_targets
    from pipeline.steps.train_teacher import train_teacher

    catalog = Catalog(tmp_path / "data")
    shutil.copytree(refitted.root, catalog.root)
    teacher = catalog.teacher(DS, TINY)
    old = ModelMetadata.load(teacher)  # as exported before the selection weights were kept
    dataclasses.replace(old, selection_checkpoint=None).save(teacher)
    with pytest.raises(ArtifactNotFound, match="has no selection-run weights .*run train_teacher again"):
        generate_soft_targets(DS, catalog, TINY)
    assert train_teacher(DS, catalog, TINY, reuse=True)["reused"] is False


def test_refit_without_the_refit_phase_columns_is_refused():
    from pipeline.modeling.training import train_two_tower

    with pytest.raises(ValueError, match="student: no user columns for the refit phase"):
        train_two_tower(None, None, "features", None, 0, TINY, 1, "student", user_columns={SELECTION_RUN: object()})


def test_spark_engine_writes_the_same_selection_set(refitted, spark):
    from pipeline.steps.soft_targets import generate_soft_targets

    on_spark = dataclasses.replace(TINY, soft_targets=dataclasses.replace(TINY.soft_targets, spark_min_users=1))
    result = generate_soft_targets(DS, refitted, on_spark, spark=spark)
    assert result["engine"] == "spark" and result["selection"]["teacher_weights"] == "checkpoint_selection"
    assert SoftTargetManifest.load(result["selection"]["path"]).engine == "spark"
    numpy_set = refitted.selection_soft_targets(DS, TINY)
    assert (Path(result["selection"]["path"]) / "users.parquet").read_bytes() == (numpy_set / "users.parquet").read_bytes()
