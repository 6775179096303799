"""The common shape of every ``python -m pipeline.<step>`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.catalog import Catalog
from pipeline.config import ConfigError, PipelineConfig, load_config, parse_ds


def parser(description: str) -> argparse.ArgumentParser:
    """Arguments every step takes: ``--ds``, ``--config``, ``--data-root``, ``--set``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--ds", required=True, help="logical date YYYY-MM-DD")
    p.add_argument("--config", help="pipeline config JSON file")
    p.add_argument("--data-root", default="data", help="root of raw/, features/, models/, ... (default: data)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON",
                   help='override one setting, e.g. --set distill.alpha=0.7 (repeatable)')
    return p


def overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["distill.alpha=0.7", "student.embedding_dim=8"]`` -> nested dict."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set takes SECTION.KEY=VALUE, got {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *sections, leaf = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return nested


def settings(args: argparse.Namespace) -> tuple[str, Catalog, PipelineConfig]:
    """``(ds, catalog, cfg)`` from parsed :func:`parser` arguments; the catalogue names the
    feature set these settings build for ``ds`` from the raw files as they are now.

    Raises:
        ConfigError: A bad date or setting.
    """
    ds, cfg = parse_ds(args.ds).isoformat(), load_config(overrides(args.set), args.config)
    return ds, Catalog(Path(args.data_root)).for_run(ds, cfg), cfg


def run_step(step: Callable[[str, Catalog, PipelineConfig], dict], description: str, argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run ``step(ds, catalog, cfg)``, print its result as JSON.

    Returns:
        0 on success, 2 on a bad argument or setting, 1 on a failed step.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser(description).parse_args(argv)
    try:
        ds, catalog, cfg = settings(args)
    except ConfigError as err:
        logging.getLogger(__name__).error("%s", err)
        return 2
    try:
        result = step(ds, catalog, cfg)
    except (FileNotFoundError, ValueError) as err:
        logging.getLogger(__name__).error("%s", err)
        return 1
    json.dump(result, sys.stdout, indent=2, default=str)
    print()
    return 0
