"""The data root every run must stay inside, and the checks that keep each path in it.

Every path the catalogue hands out must resolve, symlinks followed, inside its allowed root
(the data root, or ``$RECSYS_DATA_ROOT`` for a run): a symlink that stays inside is fine,
one that leaves it raises :class:`OutsideDataRoot` at the step that would use it.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.data.contract import SIDE_TABLES, side_table_dir, window_partitions

DATA_ROOT_ENV = "RECSYS_DATA_ROOT"
REPO_ROOT = Path(__file__).resolve().parents[1]


class OutsideDataRoot(ValueError):
    """A path the pipeline would use resolves (through a symlink) outside the allowed data root."""


def configured_data_root() -> Path:
    """The data root every run must stay inside: ``$RECSYS_DATA_ROOT`` or ``<repo>/data``."""
    return Path(os.environ.get(DATA_ROOT_ENV) or REPO_ROOT / "data").resolve()


def run_data_root(value: str | None) -> Path:
    """A run's data root from its ``data_root`` param (None: the configured root; relative:
    below it), resolved.

    Raises:
        ConfigError: When it resolves outside :func:`configured_data_root`.
    """
    allowed = configured_data_root()
    data_root = Path(value or allowed)
    data_root = (data_root if data_root.is_absolute() else allowed / data_root).resolve()
    if data_root != allowed and allowed not in data_root.parents:
        raise ConfigError(f"data_root {value!r} resolves to {data_root}, outside the configured data root {allowed} (${DATA_ROOT_ENV})")
    return data_root


def confine(path: str | Path, allowed: str | Path) -> Path:
    """``path`` itself, once it is known to resolve inside ``allowed``.

    Both are resolved with symlinks followed (so a data root reached through a link is
    fine, and so is a link that stays inside it); ``path`` need not exist yet: its existing
    part is resolved and the rest taken as written.

    Raises:
        OutsideDataRoot: Naming ``path``, where it resolves and the allowed root.
    """
    path = Path(path)
    try:
        target, root = path.resolve(), Path(allowed).resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
        raise OutsideDataRoot(f"{path} cannot be resolved inside the data root {allowed}: {err}") from err
    if target != root and root not in target.parents:
        raise OutsideDataRoot(f"{path} resolves to {target}, outside the data root {root}: "
                              "a symlink under the data root must point inside it")
    return path


def confine_tree(directory: str | Path, allowed: str | Path) -> Path:
    """``directory`` itself, once it and every entry below it resolve inside ``allowed``.

    For inputs read file by file (raw partitions, a SavedModel being copied): a link below
    ``directory`` is checked, never descended.

    Raises:
        OutsideDataRoot: For the first entry that leaves ``allowed``.
    """
    directory = confine(directory, allowed)
    for parent, dirs, files in os.walk(directory):
        for name in dirs + files:
            confine(Path(parent) / name, allowed)
    return directory


def confine_raw_window(raw_root: str | Path, window_start: dt.date, window_end: dt.date, allowed: str | Path) -> None:
    """Check that the raw window's event partitions and side tables, and every file in them,
    resolve inside ``allowed`` (what the pre-flight check and the feature job read).

    Raises:
        OutsideDataRoot: For the first path that leaves ``allowed``.
        RawWindowError: When the window holds no partition at all.
    """
    for directory in [*window_partitions(raw_root, window_start, window_end),
                      *(side_table_dir(raw_root, name) for name in SIDE_TABLES)]:
        confine_tree(directory, allowed)
