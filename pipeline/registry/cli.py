"""``python -m pipeline.registry``: list, show and roll back one model of a registry."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.registry.store import DEFAULT_MODEL, Registry, RegistryError


def main(argv=None) -> int:
    """``list``, ``show N``, ``rollback [N]`` and ``serving-config`` for one model of a registry."""
    parser = argparse.ArgumentParser(description="Inspect the model registry and roll back the champion.")
    parser.add_argument("--registry", default="data/registry", help="registry root (default: data/registry)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="versions with their metrics, every run attempt and champion change")
    show = sub.add_parser("show", help="one version's lineage")
    show.add_argument("version", type=int)
    back = sub.add_parser("rollback", help="re-point the champion (default: the previous champion)")
    back.add_argument("version", type=int, nargs="?")
    back.add_argument("--reason", default="", help="why, for the champion log")
    sub.add_parser("serving-config", help="rewrite <registry>/models.config (and serving.json) from the champions")
    args = parser.parse_args(argv)
    registry = Registry(args.registry, args.model)
    try:
        if args.command == "list":
            print_listing(registry)
        elif args.command == "show":
            print(json.dumps(registry.lineage(args.version), indent=2))
        elif args.command == "rollback":
            print(f"champion is now version {registry.rollback(args.version, args.reason)}")
        else:
            print(f"wrote {registry.write_serving_config()}")
    except RegistryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def print_listing(registry: Registry) -> None:
    """Versions (champion starred), then every run attempt and champion change in order."""
    champion = registry.champion()
    print(f"{'version':>7}  {'champion':8}  {'ds':10}  {'teacher':24}  metrics")
    for version in registry.versions():
        lin = registry.lineage(version)
        metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted(lin.get("metrics", {}).items()) if isinstance(v, float))
        print(f"{version:>7}  {'*' if version == champion else '':8}  {lin.get('ds', ''):10}  {lin.get('teacher_version', ''):24}  {metrics}")
    for run in registry.runs():
        version = f" version {run['version']}" if run.get("version") is not None else ""
        print(f"run {run.get('at', '-')} {run['run_key']} [{run.get('run_id', '-')}]: {run.get('decision')}{version}"
              f" {'; '.join(run.get('reasons', []))}".rstrip())
    for change in registry.champion_log():
        print(f"champion {change['at']} {change['action']}: {change['previous']} -> {change['version']} ({change.get('reason', '')})")
