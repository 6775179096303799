"""Model registry in TF Serving layout: versions, lineage, a champion alias, and journals.

Layout under ``<registry>/``::

    models.config                   TF Serving config pinning every model to its champion
    <model>/1/ 2/ ...               TF Serving versions (saved_model.pb, variables/), integers that only grow
    <model>/<N>/assets.extra/lineage.json   ds, run id, teacher version, features, soft targets,
                                    config hash, metrics, blessing (TF Serving ignores assets.extra)
    <model>/champion.json           the current champion, and the champions before it (for rollback)
    <model>/champion_log.jsonl      every champion decision, appended: promote, rollback, rerun
    <model>/runs.jsonl              every run attempt, appended: BLESSED / NOT_BLESSED and why
    <model>/.lock                   the lock that serialises writers of this model

A version is copied into a locked temporary directory and flushed outside the lock; under
the lock it gets the next number and is renamed into place (TF Serving and readers never
see a partial version), then ``champion.json`` and ``models.config`` are rewritten
atomically and the change is journaled. A re-run of a ``run_key`` published before adds
no version and leaves the champion where it is, so an operator's rollback holds until the
next new blessed promotion. ``python -m pipeline.registry`` lists, shows and rolls back.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from pipeline.io import (append_jsonl, crash_point, file_lock, fsync_dir, fsync_tree, read_jsonl, temp_dir, write_json,
                         write_text)
from pipeline.tf_serving import models_config

DEFAULT_MODEL = "recsys_student"
CHAMPION_FILE = "champion.json"
CHAMPION_LOG = "champion_log.jsonl"
RUN_LOG = "runs.jsonl"
LOCK_FILE = ".lock"
MODELS_CONFIG = "models.config"
# models.config lists every model of the root, so its writers (one per model lock) share one lock.
MODELS_CONFIG_LOCK = ".models.config.lock"
RUN_FIELDS = ("run_key", "ds", "config_hash", "decision", "reasons")


class RegistryError(RuntimeError):
    """A registry operation cannot be done (unknown version, nothing to roll back to)."""


@dataclass(frozen=True)
class Promotion:
    """What :meth:`Registry.promote` did.

    Attributes:
        version: The run's version: new, or the one published by an earlier attempt.
        champion: The champion after the call.
        rerun: True when the run_key had been published before; the champion was left alone.
    """

    version: int
    champion: int | None
    rerun: bool


def utc_now() -> str:
    """When a record is written (UTC, microseconds): journal entries say when they happened."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


class Registry:
    """One model's versions, champion and journals under a registry root."""

    def __init__(self, root: str | Path, model: str = DEFAULT_MODEL):
        self.root = Path(root)
        self.path = self.root / model
        self.model = model

    # ------------------------------------------------------------------ reading
    def versions(self) -> list[int]:
        """Published versions, ascending."""
        if not self.path.is_dir():
            return []
        return sorted(int(p.name) for p in self.path.iterdir() if p.is_dir() and p.name.isdigit())

    def lineage(self, version: int) -> dict:
        """The lineage stored with ``version``.

        Raises:
            RegistryError: When there is no such version.
        """
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

    def runs(self, run_key: str | None = None) -> list[dict]:
        """Every recorded run attempt (of ``run_key``, if given), oldest first.

        Records of registries from before the journal (``runs/<run_key>.json``, one per key)
        come first.
        """
        legacy = sorted((self.path / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
        records = [json.loads(p.read_text()) for p in legacy] + read_jsonl(self.path / RUN_LOG)
        return [r for r in records if run_key is None or r.get("run_key") == run_key]

    def champion_log(self) -> list[dict]:
        """Every champion decision (``promote``, ``rollback``, ``rerun``), oldest first."""
        return read_jsonl(self.path / CHAMPION_LOG)

    # ------------------------------------------------------------------ writing
    def record_run(self, record: Mapping) -> dict:
        """Append one run attempt to the run journal; earlier attempts are never rewritten.

        Args:
            record: At least ``run_key``, ``ds``, ``config_hash``, ``decision`` and ``reasons``;
                ``run_id`` (the Airflow run id) and ``version`` when there are; any lineage.

        Returns:
            The record as stored, with ``at`` (UTC) and a ``run_id`` (``local-<uuid>`` when
            none was given, so every attempt can be told apart).

        Raises:
            RegistryError: When a required field is missing.
        """
        missing = [name for name in RUN_FIELDS if name not in record]
        if missing:
            raise RegistryError(f"run record of {record.get('run_key')!r} lacks {missing}")
        with self._lock():
            stored = {**record, "at": utc_now(), "run_id": record.get("run_id") or f"local-{uuid.uuid4().hex}",
                      "version": record.get("version")}
            append_jsonl(self.path / RUN_LOG, stored)
        return stored

    def promote(self, saved_model_dir: str | Path, lineage: Mapping) -> Promotion:
        """Publish a blessed SavedModel as the next version and make it the champion.

        The rule for re-runs: if ``lineage["run_key"]`` was published before, no version is
        added and the champion is not touched (it may be a rolled-back or a newer version);
        the decision is journaled as ``rerun``. Only a new run_key moves the champion. The
        one exception is a promotion that a crash cut short -- its version was published
        but never made champion (no ``promote`` entry in the journal) -- which the re-run
        completes, so a killed promotion and its re-run end as one uninterrupted promotion.

        Args:
            saved_model_dir: The student's exported SavedModel.
            lineage: Must hold ``run_key``; ``run_id`` is journaled; stored with the version.

        Returns:
            The :class:`Promotion`.
        """
        run_key, run_id = lineage["run_key"], lineage.get("run_id")
        self.path.mkdir(parents=True, exist_ok=True)
        with temp_dir(self.path / "version") as tmp:
            # Copied and flushed outside the lock, so a rollback never waits for a copy.
            shutil.copytree(saved_model_dir, tmp, dirs_exist_ok=True)
            fsync_tree(tmp)
            with self._lock():
                existing = self.find(run_key)
                if existing is not None and self._promoted(existing):
                    champion = self.champion()
                    reason = f"re-run of {run_key}: version {existing} was published before; champion stays {champion}"
                    self._journal_champion("rerun", champion, champion, run_key=run_key, run_id=run_id, reason=reason)
                    self.write_serving_config()  # in case the earlier attempt died before it
                    return Promotion(existing, champion, rerun=True)
                if existing is None:
                    version = (self.versions() or [0])[-1] + 1
                    (tmp / "assets.extra").mkdir(exist_ok=True)
                    write_json(tmp / "assets.extra" / "lineage.json", {**lineage, "version": version, "model": self.model})
                    os.rename(tmp, self.path / str(version))
                    fsync_dir(self.path)
                    crash_point("promote.published")
                    reason = f"promoted {run_key}"
                else:
                    version, reason = existing, f"promoted {run_key} (completing an interrupted promotion)"
                self._move_champion(version, "promote", reason, run_key=run_key, run_id=run_id)
                return Promotion(version, version, rerun=False)

    def rollback(self, version: int | None = None, reason: str = "") -> int:
        """Re-point the champion at ``version``, or at the previous champion.

        Returns:
            The new champion.

        Raises:
            RegistryError: When there is no such version, or no previous champion.
        """
        if not self.versions():  # checked first, so a mistyped --model creates no directory
            raise RegistryError(f"{self.model} has no versions under {self.root}: nothing to roll back to")
        with self._lock():
            record = self._champion_record() or {}
            history = None
            if version is None:
                if not record.get("history"):
                    raise RegistryError(f"{self.model}: no previous champion to roll back to")
                version, history = record["history"][-1], record["history"][:-1]
            self._check_version(version)
            self._move_champion(version, "rollback", reason or f"rollback from {record.get('version')} to {version}", history)
        return version

    def write_serving_config(self) -> Path:
        """Rewrite ``<registry>/models.config`` from every model's ``champion.json`` (atomically).

        Called after every champion change; by hand (``serving-config``) for a registry
        written before this file existed.
        """
        with file_lock(self.root / MODELS_CONFIG_LOCK):
            champions = {path.parent.name: (path.parent, json.loads(path.read_text())["version"])
                         for path in sorted(self.root.glob(f"*/{CHAMPION_FILE}"))}
            return write_text(self.root / MODELS_CONFIG, models_config(champions))

    # ------------------------------------------------------------------ internals
    def _lock(self) -> contextlib.AbstractContextManager:
        """Serialise this model's writers: version numbers, champion, journals."""
        return file_lock(self.path / LOCK_FILE)

    def _check_version(self, version: int) -> None:
        if version not in self.versions():
            raise RegistryError(f"{self.model} has no version {version} (have {self.versions()})")

    def _move_champion(self, version: int, action: str, reason: str, history: list[int] | None = None, **context) -> None:
        """Under the lock: point the champion at ``version``, journal it, re-pin serving.

        ``history`` replaces the rollback stack (a rollback to the previous champion pops
        it); by default the outgoing champion is pushed onto it.
        """
        record = self._champion_record() or {}
        previous = record.get("version")
        if history is None:
            history = record.get("history", []) + ([previous] if previous not in (None, version) else [])
        write_json(self.path / CHAMPION_FILE, {"version": version, "history": history, "reason": reason, "at": utc_now()})
        crash_point("promote.champion_written")
        self._journal_champion(action, version, previous, reason=reason, **context)
        self.write_serving_config()

    def _journal_champion(self, action: str, version: int | None, previous: int | None, **context) -> None:
        append_jsonl(self.path / CHAMPION_LOG, {"at": utc_now(), "action": action, "version": version, "previous": previous, **context})

    def _promoted(self, version: int) -> bool:
        """Whether ``version`` was ever made champion by a promotion, per the journal (always
        true in a registry from before the journal existed, which kept ``runs/<run_key>.json``)."""
        if not (self.path / CHAMPION_LOG).is_file() and (self.path / "runs").is_dir():
            return True
        return any(e.get("action") == "promote" and e.get("version") == version for e in self.champion_log())

    def _champion_record(self) -> dict | None:
        path = self.path / CHAMPION_FILE
        return json.loads(path.read_text()) if path.is_file() else None


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
    sub.add_parser("serving-config", help="rewrite <registry>/models.config from the champions")
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


if __name__ == "__main__":
    raise SystemExit(main())
