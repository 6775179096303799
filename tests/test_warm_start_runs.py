"""Warm start across nights, through the real training step: what it starts from and when it is cold."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.catalog import Catalog, date_partition
from pipeline.config import load_config
from pipeline.data.features import load_item_table, load_user_table
from pipeline.records import ModelMetadata
from tests.helpers import write_hand_features

NIGHT_1, NIGHT_2 = "2024-01-30", "2024-01-31"
TINY = load_config({
    "training": {"batch_size": 16, "patience": 1, "shuffle_buffer": 64, "early_stopping_k": 5},
    "teacher": {"embedding_dim": 4, "hidden_units": [4], "output_dim": 4, "epochs": 1},
    "serving": {"top_k": 5},
})


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """Two nights of hand-made features (the second with 2 new users and 2 new items) and the
    first night's teacher, trained cold."""
    from pipeline.steps.train_teacher import train_teacher

    catalog = Catalog(tmp_path_factory.mktemp("warm") / "data")
    write_hand_features(date_partition(catalog.features_home, NIGHT_1), NIGHT_1)
    write_hand_features(date_partition(catalog.features_home, NIGHT_2), NIGHT_2, users=12, items=32)
    first = train_teacher(NIGHT_1, catalog, TINY)
    return catalog, first


def test_the_first_night_is_cold_and_the_next_starts_from_it(nights):
    from pipeline.steps.train_teacher import train_teacher

    catalog, first = nights
    assert first["warm_start"] == {"cold": "no previous model of these settings"}
    second = train_teacher(NIGHT_2, catalog, TINY)
    assert second["warm_start"]["version"] == first["version"] and second["warm_start"]["ds"] == NIGHT_1
    assert second["warm_start"]["users"] == {"kept": 10, "new": 2, "dropped": 0}
    assert second["warm_start"]["items"] == {"kept": 30, "new": 2, "dropped": 0}
    assert ModelMetadata.load(second["path"]).warm_start == second["warm_start"]


def test_other_settings_start_cold_and_never_read_another_identitys_model(nights, monkeypatch):
    from pipeline.modeling import warm_start
    from pipeline.steps.train_teacher import train_teacher

    catalog, first = nights
    opened = []
    monkeypatch.setattr(warm_start.WarmStart, "__init__", _spy(warm_start.WarmStart.__init__, opened))
    wider = dataclasses.replace(TINY, teacher=dataclasses.replace(TINY.teacher, embedding_dim=6))
    assert catalog.previous_model("teacher", NIGHT_2, wider) is None
    result = train_teacher(NIGHT_2, catalog, wider)
    assert result["warm_start"] == {"cold": "no previous model of these settings"} and opened == [None]


def test_warm_start_off_is_cold(nights):
    from pipeline.steps.train_teacher import train_teacher

    catalog, _ = nights
    cold = dataclasses.replace(TINY, training=dataclasses.replace(TINY.training, warm_start=False))
    assert train_teacher(NIGHT_2, catalog, cold)["warm_start"] == {"cold": "warm start is off (training.warm_start)"}


def test_the_previous_model_is_the_newest_earlier_night_of_the_same_settings(nights):
    catalog, first = nights
    assert catalog.previous_model("teacher", NIGHT_2, TINY).name == first["version"]
    assert catalog.previous_model("teacher", NIGHT_1, TINY) is None  # never the same night, nor a later one
    # A record another code version wrote (not a config this one loads) is skipped, not fatal.
    odd = catalog.models_root / "teacher" / "2024-01-29-odd"
    odd.mkdir()
    meta = json.loads((catalog.models_root / "teacher" / first["version"] / "metadata.json").read_text())
    (odd / "metadata.json").write_text(json.dumps({**meta, "ds": "2024-01-29", "config": {"no_such_section": {}}}))
    assert catalog.previous_model("teacher", NIGHT_2, TINY).name == first["version"]


def _item_rows(catalog, ds, model):
    """``item id -> row`` of ``model``'s candidate item embedding, on night ``ds``'s vocabulary."""
    table = model.candidate.item_embedding.embeddings.numpy()
    return {item: table[row] for row, item in enumerate(load_item_table(catalog.features(ds)).item_ids) if row > 0}


def _night_models(catalog, ds, cfg, phase, warm):
    from pipeline.modeling.models import build_teacher

    features = catalog.features(ds)
    users, items = load_user_table(features), load_item_table(features)
    return warm.apply(build_teacher(users, items, cfg), users, items, phase)


def _restored(catalog, model_dir, folder):
    from pipeline.modeling.models import build_teacher
    from pipeline.modeling.warm_start import _build

    features = catalog.features(NIGHT_1)
    model = build_teacher(load_user_table(features), load_item_table(features), TINY)
    _build(model)
    model.load_weights(str(Path(model_dir) / folder / "weights")).expect_partial()
    return _item_rows(catalog, NIGHT_1, model)


def test_each_phase_starts_from_last_nights_weights_of_that_phase(nights):
    """Last night's refit trained on its validation days, most of which are tonight's validation:
    tonight's selection run, judged on validation, starts from last night's selection run."""
    from pipeline.modeling.models import build_teacher
    from pipeline.modeling.training import REFIT_RUN, SELECTION_RUN
    from pipeline.modeling.warm_start import WarmStart

    catalog, first = nights
    warm = WarmStart(Path(first["path"]), build_teacher)
    selection, refit = (_restored(catalog, first["path"], folder) for folder in ("checkpoint_selection", "checkpoint"))
    assert any(not np.allclose(selection[item], refit[item]) for item in selection)
    for phase, expected in ((SELECTION_RUN, selection), (REFIT_RUN, refit)):
        started = _item_rows(catalog, NIGHT_2, _night_models(catalog, NIGHT_2, TINY, phase, warm))
        kept = [item for item in started if item in expected]
        assert len(kept) == 30
        for item in kept:
            np.testing.assert_array_equal(started[item], expected[item], err_msg=f"{phase}: item {item}")
    assert warm.record["phases"] == {SELECTION_RUN: "checkpoint_selection", REFIT_RUN: "checkpoint"}


def test_a_refitted_model_without_selection_weights_starts_tonights_selection_run_cold(nights, tmp_path):
    from pipeline.modeling.models import build_teacher
    from pipeline.modeling.training import REFIT_RUN, SELECTION_RUN, seed_everything
    from pipeline.modeling.warm_start import WarmStart, _build

    catalog, first = nights
    older = tmp_path / first["version"]
    shutil.copytree(first["path"], older)
    shutil.rmtree(older / "checkpoint_selection")
    dataclasses.replace(ModelMetadata.load(older), selection_checkpoint=None).save(older)
    warm = WarmStart(older, build_teacher)
    assert warm.record["phases"][SELECTION_RUN].startswith("cold: ")
    assert warm.record["phases"][REFIT_RUN] == "checkpoint"
    fresh = []
    for apply in (False, True):  # the same seed builds the same fresh weights: apply leaves them as built
        seed_everything(7)
        model = build_teacher(load_user_table(catalog.features(NIGHT_2)), load_item_table(catalog.features(NIGHT_2)), TINY)
        _build(model)
        if apply:
            warm.apply(model, load_user_table(catalog.features(NIGHT_2)), load_item_table(catalog.features(NIGHT_2)), SELECTION_RUN)
        fresh.append(_item_rows(catalog, NIGHT_2, model))
    assert all(np.array_equal(fresh[0][item], fresh[1][item]) for item in fresh[0])


def _spy(init, opened):
    def spied(self, previous, *args, **kwargs):
        opened.append(previous)
        return init(self, previous, *args, **kwargs)
    return spied


def test_a_warm_start_trains_at_the_warm_learning_rate_and_patience_and_a_cold_one_does_not(nights, monkeypatch, tmp_path):
    """Each warm phase trains at ``warm_learning_rate_scale`` x the rate, a warm selection run
    stops after ``warm_patience`` epochs without gain; another warm policy still finds last night's model."""
    from pipeline.modeling import training
    from pipeline.steps.train_teacher import train_teacher

    catalog, first = nights
    rates, patiences = [], []
    compiled, fit = training._compiled, training.fit_with_early_stopping
    monkeypatch.setattr(training, "_compiled", lambda model, rate: (rates.append(rate), compiled(model, rate))[1])
    monkeypatch.setattr(training, "fit_with_early_stopping",
                        lambda model, data, epochs, patience, *rest, **kw: (patiences.append(patience),
                                                                            fit(model, data, epochs, patience, *rest, **kw))[1])
    policy = dataclasses.replace(TINY.training, warm_learning_rate_scale=0.25, warm_patience=3)
    rate = TINY.training.learning_rate
    warm_cfg = dataclasses.replace(TINY, training=policy)
    assert catalog.previous_model("teacher", NIGHT_2, warm_cfg).name == first["version"]
    result = train_teacher(NIGHT_2, catalog, warm_cfg)
    assert result["warm_start"]["version"] == first["version"]
    assert rates == [rate / 4, rate / 4] and patiences == [3]
    assert ModelMetadata.load(result["path"]).extra["schedule"] == {
        "selection": {"warm": True, "learning_rate": rate / 4, "patience": 3}, "refit": {"warm": True, "learning_rate": rate / 4}}
    # The same policy on a night with nothing before it trains as a cold start.
    rates.clear(), patiences.clear()
    alone = Catalog(tmp_path / "data")
    write_hand_features(date_partition(alone.features_home, NIGHT_1), NIGHT_1)
    cold = train_teacher(NIGHT_1, alone, warm_cfg)
    assert "cold" in cold["warm_start"] and rates == [rate, rate] and patiences == [1]
    assert ModelMetadata.load(cold["path"]).extra["schedule"]["selection"] == {"warm": False, "learning_rate": rate, "patience": 1}


def test_a_model_trained_cold_or_under_another_warm_policy_is_still_last_nights_model(nights):
    catalog, first = nights
    for change in ({"warm_start": False}, {"warm_learning_rate_scale": 0.5}, {"warm_patience": 9}, {"warm_keep": 0.9}):
        other = dataclasses.replace(TINY, training=dataclasses.replace(TINY.training, **change))
        assert catalog.previous_model("teacher", NIGHT_2, other).name == first["version"], change
    # Anything else in the training section is another model: no warm start from it.
    other = dataclasses.replace(TINY, training=dataclasses.replace(TINY.training, learning_rate=0.01))
    assert catalog.previous_model("teacher", NIGHT_2, other) is None


def test_the_reports_start_line_names_a_phase_that_started_cold():
    from pipeline.steps.run import _start

    assert _start(None) == "cold"
    assert _start({"cold": "warm start is off (training.warm_start)"}) == "cold: warm start is off (training.warm_start)"
    warm = {"from": "/m/v1", "version": "v1", "ds": NIGHT_1, "phases": {"selection": "checkpoint_selection", "refit": "checkpoint"}}
    assert _start(warm) == f"warm from v1 (ds {NIGHT_1})"
    half = {**warm, "phases": {"selection": "cold: v1 was refitted without its selection run's weights", "refit": "checkpoint"}}
    assert _start(half) == f"warm from v1 (ds {NIGHT_1}); selection run cold: v1 was refitted without its selection run's weights"
    assert _start({**warm, "keep": 0.5}) == f"warm from v1 (ds {NIGHT_1}), its weights shrunk to keep 0.5"


def test_a_model_that_was_not_refitted_is_restored_once_for_both_phases(nights):
    from pipeline.modeling.models import build_teacher
    from pipeline.modeling.training import REFIT_RUN, SELECTION_RUN
    from pipeline.modeling.warm_start import WarmStart
    from pipeline.steps.train_teacher import train_teacher

    catalog, _ = nights
    single = dataclasses.replace(TINY, training=dataclasses.replace(TINY.training, refit=False))
    previous = train_teacher(NIGHT_1, catalog, single)
    built = []
    warm = WarmStart(Path(previous["path"]), lambda *args: built.append(build_teacher(*args)) or built[-1])
    assert warm.record["phases"] == {SELECTION_RUN: "checkpoint", REFIT_RUN: "checkpoint"}
    assert len(built) == 1 and warm.previous[SELECTION_RUN] is warm.previous[REFIT_RUN] is built[0]
