"""The error every invalid setting raises, and the check that raises it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
