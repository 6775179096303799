"""The error every invalid setting raises, and the checks that raise it.

Settings arrive as JSON-like values (Params, config files, ``--set`` pairs).
:func:`apply_settings` checks each against its field's type annotation before a config
dataclass sees it, so a section's ``__post_init__`` checks ranges and relations only, on
values of the right type. A field's ``metadata["expects"]`` may word what its value must be
(``"a master URL"``) where the type alone says too little.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import math
import reprlib
import types
import typing
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def shown(value: Any) -> str:
    """``value`` as messages show it: JSON's ``null``, ``true`` and ``false``, else its (shortened) repr."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return reprlib.repr(value)


def object_expected(where: str, value: Any) -> ConfigError:
    """The error for ``value`` found where a JSON object of settings belongs."""
    got = "null" if value is None else f"{type(value).__name__} {shown(value)}"
    return ConfigError(f"{where} must be a JSON object, got {got}")


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or a float; a bool is not (JSON's ``true`` is no number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def apply_settings(current: Any, values: Any, where: str) -> Any:
    """``current`` (a config dataclass instance) with ``values`` applied, every one checked.

    Args:
        current: The settings before ``values``; the fields ``values`` does not name keep theirs.
        values: Field name -> JSON-like value; a nested dataclass field takes an object.
        where: How messages name ``current``, e.g. ``"config.gate"``.

    Returns:
        A new instance of ``current``'s class.

    Raises:
        ConfigError: Naming the setting and its value, on an unknown name (with the nearest
            known one), a value of the wrong type (a string or ``true`` for a number, NaN,
            infinity, a null section, ...) or out of range.
    """
    if not isinstance(values, Mapping):
        raise object_expected(where, values)
    fields = {field.name: field for field in dataclasses.fields(current)}
    _reject_unknown(values, list(fields), where)
    hints = _hints(type(current))
    changes = {name: _checked(value, hints[name], getattr(current, name), f"{where}.{name}", fields[name].metadata.get("expects"))
               for name, value in values.items()}
    try:
        return dataclasses.replace(current, **changes)
    except ConfigError as err:
        # A TowerConfig serves both teacher and student, so its messages cannot name the section.
        if str(err).startswith(where.rpartition(".")[2]):
            raise
        raise ConfigError(f"{where}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where} cannot take {dict(values)!r}: {type(err).__name__}: {err}") from err


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _reject_unknown(values: Mapping[Any, Any], names: list[str], where: str) -> None:
    unknown = [key for key in values if key not in names]
    if not unknown:
        return
    nearest = {key: difflib.get_close_matches(str(key), names, n=1) for key in unknown}
    guesses = [match[0] if len(unknown) == 1 else f"{match[0]} (for {key})" for key, match in nearest.items() if match]
    notes = [f"did you mean {', '.join(guesses)}?"] if guesses else []
    if len(guesses) < len(unknown):
        notes.append(f"known: {sorted(names)}")
    raise ConfigError(f"unknown setting(s) {[f'{where}.{key}' for key in unknown]}; {' '.join(notes)}")


def _checked(value: Any, hint: Any, current: Any, name: str, expects: str | None = None) -> Any:
    """``value`` as a setting of type ``hint`` (its value so far ``current``), or a ConfigError naming ``name``."""
    if dataclasses.is_dataclass(hint):
        return apply_settings(current, value, name)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return None if value is None else _checked_value(value, inner, name, expects, " or null")
    return _checked_value(value, hint, name, expects)


def _checked_value(value: Any, hint: Any, name: str, expects: str | None = None, or_null: str = "") -> Any:
    def need(ok: bool, kind: str) -> None:
        _check(ok, f"{name} must be {expects or kind}{or_null}, got {shown(value)}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        need(isinstance(value, bool), "true or false")
        return value
    if hint is int:
        need(is_number(value) and (isinstance(value, int) or value.is_integer()), "a whole number")
        need(-(2**63) <= value < 2**63, "a 64-bit whole number")  # what Spark and TensorFlow hold
        return int(value)
    if hint is float:
        need(is_number(value), "a number")
        need(_finite(value), "a finite number")
        return float(value)
    if hint is str:
        need(isinstance(value, str), "a string")
        return value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        need(isinstance(value, (list, tuple)), "a list")
        return tuple(_checked_value(item, args[0], f"{name}[{i}]") for i, item in enumerate(value))
    if origin is collections.abc.Mapping and args[0] is str:
        need(isinstance(value, Mapping) and all(isinstance(key, str) for key in value), "a JSON object")
        return {key: _checked_value(item, args[1], f"{name}.{key}") for key, item in value.items()}
    raise TypeError(f"{name}: no check for settings of type {hint!r}; add one to pipeline.config.checks")


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False
