"""Model registry in TF Serving layout, with blessings, lineage and a champion alias.

Layout under ``<registry>/<model>/``::

    1/ 2/ ...               TF Serving versions (saved_model.pb, variables/), integers that only grow
    <N>/assets.extra/lineage.json   ds, run id, teacher version, features, soft targets,
                                    config hash, metrics, blessing (TF Serving ignores assets.extra)
    champion.json           the serving version, and the champions before it (for rollback)
    runs/<ds>-<config hash>.json    every run's blessing (BLESSED / NOT_BLESSED and why)

A version is copied into a hidden temporary directory, flushed, then renamed to its
number, so TF Serving and readers never see a partial version; the champion alias is
rewritten atomically after that. ``python -m pipeline.registry`` lists, shows and rolls back.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

from pipeline.io import fsync_tree, write_json

DEFAULT_MODEL = "recsys_student"


class RegistryError(RuntimeError):
    """A registry operation cannot be done (unknown version, nothing to roll back to)."""


class Registry:
    """One model's versions, champion and run records."""

    def __init__(self, root: str | Path, model: str = DEFAULT_MODEL):
        self.path = Path(root) / model
        self.model = model

    # ------------------------------------------------------------------ reading
    def versions(self) -> list[int]:
        """Published versions, ascending."""
        if not self.path.is_dir():
            return []
        return sorted(int(p.name) for p in self.path.iterdir() if p.is_dir() and p.name.isdigit())

    def lineage(self, version: int) -> dict:
        path = self.path / str(version) / "assets.extra" / "lineage.json"
        if not path.is_file():
            raise RegistryError(f"{self.model} has no version {version} (have {self.versions()})")
        return json.loads(path.read_text())

    def champion(self) -> int | None:
        """The serving version, or None before the first promotion."""
        record = self._champion_record()
        return record["version"] if record else None

    def find(self, run_key: str) -> int | None:
        """The version already promoted for ``run_key`` (same ds and config), if any."""
        for version in self.versions():
            if self.lineage(version).get("run_key") == run_key:
                return version
        return None

    def runs(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.path / "runs").glob("*.json"))]

    # ------------------------------------------------------------------ writing
    def record_run(self, run_key: str, record: dict) -> Path:
        """Write (or rewrite, on a re-run) the run's blessing record."""
        (self.path / "runs").mkdir(parents=True, exist_ok=True)
        return write_json(self.path / "runs" / f"{run_key}.json", {"run_key": run_key, **record})

    def promote(self, saved_model_dir: str | Path, lineage: dict) -> int:
        """Publish a blessed SavedModel as the next version and make it the champion.

        Idempotent: if ``lineage["run_key"]`` was promoted before, that version is made
        champion again and returned; no duplicate version is created.

        Args:
            saved_model_dir: The student's exported SavedModel.
            lineage: Must hold ``run_key``; stored with the version.

        Returns:
            The version number.
        """
        existing = self.find(lineage["run_key"])
        if existing is not None:
            self.set_champion(existing, reason=f"re-run of {lineage['run_key']}")
            return existing
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".tmp-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(saved_model_dir, tmp)
            version = (self.versions() or [0])[-1] + 1
            (tmp / "assets.extra").mkdir(exist_ok=True)
            write_json(tmp / "assets.extra" / "lineage.json", {**lineage, "version": version, "model": self.model})
            fsync_tree(tmp)
            os.rename(tmp, self.path / str(version))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.set_champion(version, reason=f"promoted {lineage['run_key']}")
        return version

    def set_champion(self, version: int, reason: str = "") -> None:
        """Point the champion alias at ``version`` (atomically), keeping the previous ones."""
        if version not in self.versions():
            raise RegistryError(f"{self.model} has no version {version} (have {self.versions()})")
        record = self._champion_record() or {"history": []}
        if record.get("version") == version:
            return
        history = record.get("history", []) + ([record["version"]] if "version" in record else [])
        write_json(self.path / "champion.json", {"version": version, "history": history, "reason": reason})

    def rollback(self, version: int | None = None) -> int:
        """Re-point the champion at ``version``, or at the previous champion."""
        record = self._champion_record()
        if version is None:
            if not record or not record.get("history"):
                raise RegistryError(f"{self.model}: no previous champion to roll back to")
            version = record["history"][-1]
            history = record["history"][:-1]
            write_json(self.path / "champion.json", {"version": version, "history": history, "reason": f"rollback from {record['version']}"})
            return version
        self.set_champion(version, reason="rollback")
        return version

    def _champion_record(self) -> dict | None:
        path = self.path / "champion.json"
        return json.loads(path.read_text()) if path.is_file() else None


def main(argv=None) -> int:
    """``list``, ``show N`` and ``rollback [N]`` for one model of a registry."""
    parser = argparse.ArgumentParser(description="Inspect the model registry and roll back the champion.")
    parser.add_argument("--registry", default="data/registry", help="registry root (default: data/registry)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="versions with their blessing and metrics")
    show = sub.add_parser("show", help="one version's lineage")
    show.add_argument("version", type=int)
    back = sub.add_parser("rollback", help="re-point the champion (default: the previous champion)")
    back.add_argument("version", type=int, nargs="?")
    args = parser.parse_args(argv)
    registry = Registry(args.registry, args.model)
    try:
        if args.command == "list":
            champion = registry.champion()
            print(f"{'version':>7}  {'champion':8}  {'ds':10}  {'teacher':24}  metrics")
            for version in registry.versions():
                lin = registry.lineage(version)
                metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted(lin.get("metrics", {}).items()) if isinstance(v, float))
                print(f"{version:>7}  {'*' if version == champion else '':8}  {lin.get('ds', ''):10}  {lin.get('teacher_version', ''):24}  {metrics}")
            for run in registry.runs():
                print(f"run {run['run_key']}: {run.get('decision')} {'; '.join(run.get('reasons', []))}")
        elif args.command == "show":
            print(json.dumps(registry.lineage(args.version), indent=2))
        else:
            print(f"champion is now version {registry.rollback(args.version)}")
    except RegistryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
