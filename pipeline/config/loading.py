"""Turning run-time knobs (JSON files, ``--set`` pairs, Airflow Params) into a :class:`PipelineConfig`, once."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any, Mapping

from pipeline.config.checks import apply_settings, object_expected, shown
from pipeline.config.sections import ConfigError, PipelineConfig

# Trigger parameter -> (config section, setting): the knobs a manual run sets by name. The
# DAG's Params take their defaults from these settings, so the trigger form shows what a
# run will use.
PARAM_SETTINGS = {
    "window_days": ("features", "window_days"),
    "teacher_epochs": ("teacher", "epochs"),
    "student_epochs": ("student", "epochs"),
    "warm_start": ("training", "warm_start"),
    "distill_temperature": ("distill", "distill_temperature"),
    "alpha": ("distill", "alpha"),
    "beta": ("distill", "beta"),
    "student_ladder": ("distill", "ladder"),
    "min_change_vs_teacher": ("gate", "min_change_vs_teacher"),
    "min_change_vs_champion": ("gate", "min_change_vs_champion"),
}


def param_defaults() -> dict[str, Any]:
    """The default value of every :data:`PARAM_SETTINGS` parameter, as JSON gives it (a list for a tuple)."""
    cfg = PipelineConfig()
    values = {param: getattr(getattr(cfg, section), key) for param, (section, key) in PARAM_SETTINGS.items()}
    return {param: list(value) if isinstance(value, tuple) else value for param, value in values.items()}


def overrides_from_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested settings from trigger parameters, each setting from one source.

    Precedence: ``config_overrides`` may give any setting; a named parameter
    (:data:`PARAM_SETTINGS`) gives its setting only when changed from its default
    (:func:`param_defaults`). Airflow fills every named parameter, so one left at its
    default says nothing and yields to ``config_overrides``. A changed parameter and
    ``config_overrides`` may give the same setting only with equal values.

    Args:
        params: The DAG's params: the named parameters and ``config_overrides``, a JSON
            object of sections, e.g. ``{"gate": {"floors": {"ndcg@10": 0.05}}}``.

    Returns:
        Nested settings for :func:`load_config` (which checks them).

    Raises:
        ConfigError: When ``config_overrides`` or one of its sections is not a JSON object,
            or a changed parameter and ``config_overrides`` give one setting different values.
    """
    return _sourced_overrides(params)[0]


def setting_sources(params: Mapping[str, Any]) -> dict[str, str]:
    """Where each setting that a run changes from its default came from, for its logs and records.

    Args:
        params: As for :func:`overrides_from_params`.

    Returns:
        ``"section.key"`` -> ``"param NAME"``, ``"config_overrides"`` or ``"param NAME and
        config_overrides"``, for every setting whose value differs from its default.

    Raises:
        ConfigError: As :func:`overrides_from_params` and :func:`load_config` do.
    """
    overrides, sources = _sourced_overrides(params)
    changed, default = load_config(overrides).to_dict(), PipelineConfig().to_dict()
    return {f"{section}.{key}": sources[section, key] for section, values in changed.items()
            for key, value in values.items() if value != default[section][key]}


def _sourced_overrides(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[tuple[str, str], str]]:
    """The settings of :func:`overrides_from_params`, and the source of each ``(section, key)``."""
    given = params.get("config_overrides")
    given = {} if given is None else given
    if not isinstance(given, Mapping):
        raise object_expected("config_overrides", given)
    overrides: dict[str, Any] = {}
    for section, values in given.items():
        if not isinstance(values, Mapping):
            raise object_expected(f"config_overrides.{section}", values)
        overrides[section] = dict(values)
    sources = {(section, key): "config_overrides" for section, values in overrides.items() for key in values}
    defaults = param_defaults()
    for param, (section, key) in PARAM_SETTINGS.items():
        value = params.get(param)
        if value is None or _same(value, defaults[param]):
            continue
        if key in overrides.get(section, {}):
            other = overrides[section][key]
            if not _same(value, other):
                raise ConfigError(f"{param}={shown(value)} (param) conflicts with "
                                  f"config_overrides.{section}.{key}={shown(other)}: give it once")
            sources[section, key] = f"param {param} and config_overrides"
        else:
            sources[section, key] = f"param {param}"
        overrides.setdefault(section, {})[key] = value
    return overrides, sources


def _same(a: Any, b: Any) -> bool:
    """Equal values of one kind: 7 is 7.0, but ``true`` is not 1."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # a JSON list is the setting's tuple
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def load_config(overrides: Mapping[str, Any] | None = None, path: str | Path | None = None) -> PipelineConfig:
    """Build the pipeline config from defaults, an optional JSON file, then overrides.

    Every setting is checked here, by its field's type (a finite number, a whole number,
    true or false, a string, a list or object of those, or null where allowed) and then by
    its section's ranges, so a bad value never gets past loading.

    Args:
        overrides: Nested settings, e.g. ``{"features": {"window_days": 7}}``; applied last.
        path: A JSON file of nested settings.

    Returns:
        The frozen config.

    Raises:
        ConfigError: Naming the setting and its value, on an unknown key (with the nearest
            known one), a value of the wrong type, or out of range.
    """
    merged: dict[str, Any] = {}
    if path is not None:
        try:
            merged = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from err
        if not isinstance(merged, dict):
            raise object_expected(f"config file {path}", merged)
    overrides = {} if overrides is None else overrides
    if not isinstance(overrides, Mapping):
        raise object_expected("config overrides", overrides)
    for section, values in overrides.items():
        if isinstance(values, Mapping) and isinstance(merged.get(section), Mapping):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return apply_settings(PipelineConfig(), merged, "config")


def parse_ds(value: str) -> dt.date:
    """Parse a logical date ``YYYY-MM-DD``.

    Raises:
        ConfigError: When ``value`` is not such a date.
    """
    text = str(value)
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise ValueError(text)
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"ds must be a date YYYY-MM-DD, got {value!r}") from None
