"""One typed configuration for every stage; it owns every default.

Run-time knobs (Airflow ``Param``s, CLI ``--config`` JSON files, test overrides) are turned
once into a frozen :class:`PipelineConfig` by :func:`load_config`; modules read fields
from it and never keep numbers of their own.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping

from pipeline.data.contract import EVENT_TYPES


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Feature extraction (``spark_jobs/extract_features.py``).

    Attributes:
        window_days: Days of raw partitions read, ending at (and including) ``ds``.
        max_quarantine_share: Fail the run when more than this share of the window's
            deduplicated events is quarantined.
        min_events: Fewest valid events a window may hold.
        event_weights: Implicit-feedback weight of one event of each type.
        val_fraction: Share of each eligible user's latest interactions held out
            for validation (at least one).
        test_fraction: Share held out for test (at least one; the very latest).
        min_user_interactions: Users with fewer interactions stay train-only.
        history_length: Items kept in a user's last-N history.
        spark_master: Spark master URL when the job starts its own session.
        shuffle_partitions: ``spark.sql.shuffle.partitions`` for the job.
    """

    window_days: int = 30
    max_quarantine_share: float = 0.01
    min_events: int = 1
    event_weights: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"view": 1.0, "click": 2.0, "add_to_cart": 3.0, "purchase": 5.0, "rate": 4.0}
    )
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    min_user_interactions: int = 5
    history_length: int = 20
    spark_master: str = "local[*]"
    shuffle_partitions: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "event_weights", dict(self.event_weights))
        _check(self.window_days >= 1, "features.window_days must be >= 1")
        _check(0.0 <= self.max_quarantine_share <= 1.0, "features.max_quarantine_share must be in [0, 1]")
        _check(self.min_events >= 1, "features.min_events must be >= 1")
        unknown = sorted(set(self.event_weights) - set(EVENT_TYPES))
        _check(not unknown, f"features.event_weights has unknown event types {unknown}; allowed: {list(EVENT_TYPES)}")
        missing = sorted(set(EVENT_TYPES) - set(self.event_weights))
        _check(not missing, f"features.event_weights lacks a weight for {missing}")
        _check(all(w > 0 for w in self.event_weights.values()), "features.event_weights must all be > 0")
        _check(0.0 < self.val_fraction < 0.5, "features.val_fraction must be in (0, 0.5)")
        _check(0.0 < self.test_fraction < 0.5, "features.test_fraction must be in (0, 0.5)")
        _check(self.min_user_interactions >= 3, "features.min_user_interactions must be >= 3")
        _check(self.history_length >= 1, "features.history_length must be >= 1")
        _check(self.shuffle_partitions >= 1, "features.shuffle_partitions must be >= 1")

    def window(self, ds: dt.date) -> tuple[dt.date, dt.date]:
        """First and last day (both inclusive) of the window ending at ``ds``."""
        return ds - dt.timedelta(days=self.window_days - 1), ds


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Every stage's settings."""

    features: FeatureConfig = dataclasses.field(default_factory=FeatureConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (mappings turned back into plain dicts)."""
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Short, stable hash of the settings, for lineage and idempotence checks."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix} must be a JSON object, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s) {[f'{prefix}.{k}' for k in unknown]}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name) if dataclasses.is_dataclass(cls) else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{prefix}.{name}")
        else:
            kwargs[name] = _coerce(value, default, f"{prefix}.{name}")
    return cls(**kwargs)


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
    return _build(PipelineConfig, merged, "config")


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
