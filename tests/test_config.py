"""Run-time settings into the frozen config: every value checked at load, one source per setting."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from pipeline.config import ConfigError, PipelineConfig, load_config, overrides_from_params, param_defaults, setting_sources
from pipeline.gate import evaluate_gate

NAN, INF = float("nan"), float("inf")


def rejected(overrides) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    return str(err.value)


# ---------------------------------------------------------------- every value checked at load
def test_a_string_floor_fails_at_load_not_in_the_gate():
    assert rejected({"gate": {"floors": {"ndcg@10": "0.05"}}}) == "config.gate.floors.ndcg@10 must be a number, got '0.05'"


@pytest.mark.parametrize("overrides, message", [
    # A number given as a string, in a plain field and in one whose default is null.
    ({"distill": {"alpha": "0.7"}}, "config.distill.alpha must be a number, got '0.7'"),
    ({"student": {"max_param_share": "0.1"}}, "config.student.max_param_share must be a number or null, got '0.1'"),
    ({"soft_targets": {"spark_master": 7077}}, "config.soft_targets.spark_master must be a master URL or null, got 7077"),
    # NaN and infinity (Python's json reads NaN and Infinity).
    ({"distill": {"beta": NAN}}, "config.distill.beta must be a finite number, got nan"),
    ({"gate": {"min_change_vs_teacher": NAN}}, "config.gate.min_change_vs_teacher must be a finite number, got nan"),
    ({"training": {"learning_rate": INF}}, "config.training.learning_rate must be a finite number, got inf"),
    ({"gate": {"min_change_vs_champion": -INF}}, "config.gate.min_change_vs_champion must be a finite number, got -inf"),
    ({"gate": {"floors": {"ndcg@10": NAN}}}, "config.gate.floors.ndcg@10 must be a finite number, got nan"),
    # true is no number, and a number is no true.
    ({"features": {"window_days": True}}, "config.features.window_days must be a whole number, got true"),
    ({"distill": {"alpha": False}}, "config.distill.alpha must be a number, got false"),
    ({"training": {"refit": "false"}}, "config.training.refit must be true or false, got 'false'"),
    ({"training": {"refit": 0}}, "config.training.refit must be true or false, got 0"),
    ({"features": {"window_days": 7.5}}, "config.features.window_days must be a whole number, got 7.5"),
    ({"features": {"window_days": 2**70}}, "config.features.window_days must be a 64-bit whole number, got 1180591620717411303424"),
    ({"serving": {"index": None}}, "config.serving.index must be a string, got null"),
    # Lists and objects, and what they hold.
    ({"teacher": {"hidden_units": 32}}, "config.teacher.hidden_units must be a list, got 32"),
    ({"teacher": {"hidden_units": [32, "64"]}}, "config.teacher.hidden_units[1] must be a whole number, got '64'"),
    ({"gate": {"metrics": ["ndcg@10", 10]}}, "config.gate.metrics[1] must be a string, got 10"),
    ({"features": {"event_weights": {"view": "1"}}}, "config.features.event_weights.view must be a number, got '1'"),
    ({"gate": {"floors": [0.05]}}, "config.gate.floors must be a JSON object, got [0.05]"),
    # A section that is no object.
    ({"gate": None}, "config.gate must be a JSON object, got null"),
    ({"gate": [0.05]}, "config.gate must be a JSON object, got list [0.05]"),
    ({"serving": "fast"}, "config.serving must be a JSON object, got str 'fast'"),
    # Ranges, named with the value; a tower's message gets the section it belongs to.
    ({"gate": {"floors": {"ndcg@10": 1.5}}}, "gate.floors.ndcg@10 must be a number in [0, 1], got 1.5"),
    ({"gate": {"floors": {"ndcg@10": -0.1}}}, "gate.floors.ndcg@10 must be a number in [0, 1], got -0.1"),
    ({"gate": {"metrics": ["ndcg@10", "recall@20", "users"], "floors": {"users": 0.5}}},
     "gate.floors names 'users', not a quality metric"),
    ({"student": {"dropout": 1.5}}, "config.student: tower dropout must be in [0, 1), got 1.5"),
    ({"features": {"window_days": 0}}, "features.window_days must be >= 1, got 0"),
    ({"training": {"warm_learning_rate_scale": 0}}, "training.warm_learning_rate_scale must be > 0, got 0"),
    ({"training": {"warm_patience": 0}}, "training.warm_patience must be >= 1, got 0"),
    ({"training": {"warm_keep": 0}}, "training.warm_keep must be in (0, 1], got 0"),
    ({"training": {"warm_keep": 1.5}}, "training.warm_keep must be in (0, 1], got 1.5"),
])
def test_a_bad_value_fails_at_load_naming_the_setting_and_the_value(overrides, message):
    assert message in rejected(overrides)


@pytest.mark.parametrize("overrides, message", [
    ({"gate": {"min_change_vs_teachr": -0.1}},
     "unknown setting(s) ['config.gate.min_change_vs_teachr']; did you mean min_change_vs_teacher?"),
    ({"train": {"seed": 1}}, "unknown setting(s) ['config.train']; did you mean training?"),
    ({"gate": {"modee": "absolute", "bogus": 1}},
     "unknown setting(s) ['config.gate.modee', 'config.gate.bogus']; did you mean mode (for modee)? "
     "known: ['floors', 'metrics', 'min_change_vs_champion', 'min_change_vs_teacher', 'mode']"),
])
def test_an_unknown_setting_is_rejected_with_the_nearest_name(overrides, message):
    assert rejected(overrides) == message


@pytest.mark.parametrize("bad", [None, "x", True, 0.5, -1, NAN, INF, [], ["x"], {}, {"x": "y"}])
def test_no_bad_value_of_any_setting_escapes_as_anything_but_a_config_error(bad):
    # Every field of every section, each given the same bad values: a value of its own type
    # may pass, anything else is a ConfigError naming the setting.
    defaults = PipelineConfig()
    for section in dataclasses.fields(defaults):
        for field in dataclasses.fields(getattr(defaults, section.name)):
            try:
                load_config({section.name: {field.name: bad}})
            except ConfigError as err:
                assert section.name in str(err) and field.name in str(err), str(err)


def test_every_setting_has_a_type_check_and_the_defaults_pass_it():
    # Through JSON, as a model's metadata stores the config: tuples come back as lists.
    assert load_config(json.loads(json.dumps(PipelineConfig().to_dict()))) == PipelineConfig()


def test_good_values_are_coerced_to_their_types():
    cfg = load_config({"gate": {"floors": {"ndcg@10": 0}}, "distill": {"alpha": 1}, "features": {"window_days": 7.0},
                       "teacher": {"hidden_units": [64]}, "student": {"max_param_share": None}})
    assert cfg.gate.floors == {"ndcg@10": 0.0} and isinstance(cfg.gate.floors["ndcg@10"], float)
    assert isinstance(cfg.distill.alpha, float) and cfg.features.window_days == 7 and isinstance(cfg.features.window_days, int)
    assert cfg.teacher.hidden_units == (64,) and cfg.student.max_param_share is None


def test_a_floor_from_the_config_is_compared_by_the_gate():
    # The student equals the teacher (changes 0 >= -0.05), so only the floor fails: 0.04 < 0.05.
    gate = load_config({"gate": {"floors": {"ndcg@10": 0.05}}}).gate
    metrics = {"ndcg@10": 0.04, "recall@20": 0.3}
    result = evaluate_gate(metrics, metrics, None, gate, champion_expected=False)
    assert [(c.name, c.metric) for c in result.checks if not c.passed] == [("floor", "ndcg@10")]


@pytest.mark.parametrize("params, message", [
    ({"config_overrides": {"gate": None}}, "config_overrides.gate must be a JSON object, got null"),
    ({"config_overrides": {"gate": 0.05}}, "config_overrides.gate must be a JSON object, got float 0.05"),
    ({"config_overrides": ["gate"]}, "config_overrides must be a JSON object, got list ['gate']"),
    ({"config_overrides": "gate"}, "config_overrides must be a JSON object, got str 'gate'"),
])
def test_config_overrides_that_are_not_objects_are_named(params, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        overrides_from_params(params)


# ---------------------------------------------------------------- one source per setting
def trigger(**changed) -> dict:
    """The params Airflow passes: every named parameter at its default unless ``changed``."""
    return {**param_defaults(), "config_overrides": {}, **changed}


def test_params_left_at_their_defaults_yield_to_config_overrides():
    params = trigger(config_overrides={"gate": {"min_change_vs_champion": 0.0}, "features": {"window_days": 7}})
    cfg = load_config(overrides_from_params(params))
    assert (cfg.gate.min_change_vs_champion, cfg.features.window_days) == (0.0, 7)


def test_a_changed_param_applies():
    cfg = load_config(overrides_from_params(trigger(alpha=0.7, window_days=14)))
    assert (cfg.distill.alpha, cfg.features.window_days) == (0.7, 14)


def test_a_changed_param_and_a_different_override_of_the_same_setting_conflict():
    params = trigger(window_days=7, config_overrides={"features": {"window_days": 14}})
    with pytest.raises(ConfigError, match=re.escape(
            "window_days=7 (param) conflicts with config_overrides.features.window_days=14: give it once")):
        overrides_from_params(params)


def test_a_changed_param_and_an_equal_override_agree():
    params = trigger(window_days=7, config_overrides={"features": {"window_days": 7.0}})
    assert load_config(overrides_from_params(params)).features.window_days == 7


def test_true_is_no_default_number():
    # distill_temperature defaults to 1.0, and True == 1.0 in Python: it must not pass as the default.
    with pytest.raises(ConfigError, match="config.distill.distill_temperature must be a number, got true"):
        load_config(overrides_from_params(trigger(distill_temperature=True)))


def test_setting_sources_name_where_each_changed_setting_came_from():
    params = trigger(alpha=0.7, window_days=7, config_overrides={
        "features": {"window_days": 7}, "gate": {"min_change_vs_champion": 0.0}, "serving": {"top_k": 100}})
    # serving.top_k is given, but at its default: it changes nothing, so it is not listed.
    assert setting_sources(params) == {
        "distill.alpha": "param alpha",
        "features.window_days": "param window_days and config_overrides",
        "gate.min_change_vs_champion": "config_overrides",
    }
    assert setting_sources(trigger()) == {}

