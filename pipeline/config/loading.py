"""Turning run-time knobs (JSON files, ``--set`` pairs, Airflow Params) into a :class:`PipelineConfig`, once."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any, Mapping

from pipeline.config.sections import ConfigError, PipelineConfig

# Trigger parameter -> (config section, setting): the knobs a manual run sets by name. The
# DAG's Params take their defaults from these settings, so the trigger form shows what a
# run will use.
PARAM_SETTINGS = {
    "window_days": ("features", "window_days"),
    "teacher_epochs": ("teacher", "epochs"),
    "student_epochs": ("student", "epochs"),
    "distill_temperature": ("distill", "distill_temperature"),
    "alpha": ("distill", "alpha"),
    "beta": ("distill", "beta"),
    "min_change_vs_teacher": ("gate", "min_change_vs_teacher"),
    "min_change_vs_champion": ("gate", "min_change_vs_champion"),
}


def param_defaults() -> dict[str, Any]:
    """The default value of every :data:`PARAM_SETTINGS` parameter."""
    cfg = PipelineConfig()
    return {param: getattr(getattr(cfg, section), key) for param, (section, key) in PARAM_SETTINGS.items()}


def overrides_from_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested settings from trigger parameters: ``config_overrides``, then each named parameter."""
    overrides: dict[str, Any] = {section: dict(values) for section, values in (params.get("config_overrides") or {}).items()}
    for param, (section, key) in PARAM_SETTINGS.items():
        if params.get(param) is not None:
            overrides.setdefault(section, {})[key] = params[param]
    return overrides


def _build(default: Any, values: Mapping[str, Any], prefix: str) -> Any:
    """``default`` (a config dataclass instance) with ``values`` applied, checked and coerced."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix} must be a JSON object, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(default)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown setting(s) {[f'{prefix}.{k}' for k in unknown]}; known: {sorted(names)}")
    changes = {}
    for name, value in values.items():
        current = getattr(default, name)
        if dataclasses.is_dataclass(current):
            changes[name] = _build(current, value, f"{prefix}.{name}")
        else:
            changes[name] = _coerce(value, current, f"{prefix}.{name}")
    return dataclasses.replace(default, **changes)


def _coerce(value: Any, default: Any, name: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if isinstance(default, int) and not float(value).is_integer():
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        return type(default)(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return tuple(value)
    if isinstance(default, Mapping) and not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be an object, got {value!r}")
    return value


def load_config(overrides: Mapping[str, Any] | None = None, path: str | Path | None = None) -> PipelineConfig:
    """Build the pipeline config from defaults, an optional JSON file, then overrides.

    Args:
        overrides: Nested settings, e.g. ``{"features": {"window_days": 7}}``; applied last.
        path: A JSON file of nested settings.

    Returns:
        The frozen config.

    Raises:
        ConfigError: On an unknown key, a value of the wrong type or out of range.
    """
    merged: dict[str, Any] = {}
    if path is not None:
        try:
            merged = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from err
    for section, values in (overrides or {}).items():
        if isinstance(values, Mapping) and isinstance(merged.get(section), Mapping):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return _build(PipelineConfig(), merged, "config")


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
