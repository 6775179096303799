"""The registry store: versions, lineage, the champion alias and its journals, under one lock
(the layout and the rules are in :mod:`pipeline.registry`)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from pipeline.io import (append_jsonl, crash_point, file_lock, fsync_dir, fsync_tree, read_jsonl, temp_dir, write_json,
                         write_text)
from pipeline.registry.tf_serving import SERVING_MANIFEST, models_config, serving_manifest
from pipeline.serving.index import SERVING_INDEX_DIR

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


# ``expected_champion`` of a caller that does not compare (the CLI, tests of other rules).
ANY_CHAMPION = object()


@dataclass(frozen=True)
class Promotion:
    """What :meth:`Registry.promote` did.

    Attributes:
        version: The run's version: new, or the one published by an earlier attempt; None
            when the promotion was refused before anything was published.
        champion: The champion after the call.
        rerun: True when the run_key had been promoted before; the champion was left alone.
        promoted: False when the promotion was refused (see ``reason``).
        reason: Why it was refused (empty otherwise).
    """

    version: int | None
    champion: int | None
    rerun: bool
    promoted: bool = True
    reason: str = ""


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
        """Every champion decision (``promote``, ``rollback``, ``rerun``, ``refused``), oldest first."""
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

    def promote(self, saved_model_dir: str | Path, lineage: Mapping, expected_champion=ANY_CHAMPION) -> Promotion:
        """Publish a blessed SavedModel as the next version and make it the champion, if the
        champion is still the one the student was evaluated against.

        Rules, under the registry lock:

        * a ``run_key`` promoted before (a re-run) adds no version and leaves the champion
          alone (it may be a rolled-back or a newer version); journaled as ``rerun``;
        * compare-and-swap: when the champion is no longer ``expected_champion``, nothing is
          published and the champion stays; journaled as ``refused`` ("champion changed since
          evaluation: was N, now M"), so two runs gated against one champion never both win;
        * a version published by an attempt that died before its promotion was journaled is
          completed by the re-run only if no promotion or rollback was journaled after it
          was published: a crash and its re-run never undo a later decision.

        The model's faiss serving index (``serving_index/`` beside ``saved_model_dir``, when
        there is one) is published inside the version as ``<version>/serving_index/``, in
        the same rename as the SavedModel (TF Serving ignores the folder).

        Args:
            saved_model_dir: The student's exported SavedModel.
            lineage: Must hold ``run_key``; ``run_id`` is journaled; stored with the version.
            expected_champion: The champion version (None: no champion) the gate compared the
                student with; :data:`ANY_CHAMPION` skips the comparison.

        Returns:
            The :class:`Promotion`.
        """
        run_key, run_id = lineage["run_key"], lineage.get("run_id")
        self.path.mkdir(parents=True, exist_ok=True)
        with temp_dir(self.path / "version") as tmp:
            # Copied and flushed outside the lock, so a rollback never waits for a copy.
            shutil.copytree(saved_model_dir, tmp, dirs_exist_ok=True)
            index_dir = Path(saved_model_dir).parent / SERVING_INDEX_DIR
            if index_dir.is_dir():  # published with the SavedModel, in the same rename
                shutil.copytree(index_dir, tmp / SERVING_INDEX_DIR)
            fsync_tree(tmp)
            with self._lock():
                self._reconcile()
                champion = self.champion()
                existing = self.find(run_key)
                if existing is not None and self._promoted(existing):
                    reason = f"re-run of {run_key}: version {existing} was published before; champion stays {champion}"
                    self._journal_champion("rerun", champion, champion, run_key=run_key, run_id=run_id, reason=reason)
                    return Promotion(existing, champion, rerun=True)
                refusal = self._refusal(champion, expected_champion, existing)
                if refusal:
                    self._journal_champion("refused", champion, champion, run_key=run_key, run_id=run_id, reason=refusal)
                    return Promotion(existing, champion, rerun=False, promoted=False, reason=refusal)
                if existing is None:
                    version = (self.versions() or [0])[-1] + 1
                    (tmp / "assets.extra").mkdir(exist_ok=True)
                    write_json(tmp / "assets.extra" / "lineage.json",
                               {**lineage, "version": version, "model": self.model, "published_at": utc_now()})
                    os.rename(tmp, self.path / str(version))
                    fsync_dir(self.path)
                    crash_point("promote.published")
                    reason = f"promoted {run_key}"
                else:
                    version, reason = existing, f"promoted {run_key} (completing an interrupted promotion)"
                self._move_champion(version, "promote", reason, run_key=run_key, run_id=run_id)
                return Promotion(version, version, rerun=False)

    def _refusal(self, champion: int | None, expected, existing: int | None) -> str:
        """Under the lock: why this promotion may not move the champion, or ''."""
        if expected is not ANY_CHAMPION and champion != expected:
            return (f"champion changed since evaluation: was {_named(expected)}, now {_named(champion)}; "
                    "the student was not compared with the new champion, so it is not promoted")
        if existing is not None:
            published = self._published_at(existing)
            later = [e for e in self.champion_log() if e.get("action") in ("promote", "rollback") and e.get("at", "") > published]
            if later:
                return (f"version {existing} was published by an interrupted attempt at {published}, and the champion has "
                        f"changed since ({later[-1]['action']} to {later[-1]['version']} at {later[-1]['at']}): not completing it")
        return ""

    def _published_at(self, version: int) -> str:
        """When ``version`` was published: its lineage's ``published_at``, else its lineage file's time."""
        path = self.path / str(version) / "assets.extra" / "lineage.json"
        recorded = self.lineage(version).get("published_at")
        return recorded or dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(timespec="microseconds")

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
            self._reconcile()
            record = self._champion_record() or {}
            history = None
            if version is None:
                if not record.get("history"):
                    raise RegistryError(f"{self.model}: no previous champion to roll back to")
                version, history = record["history"][-1], record["history"][:-1]
            self._check_version(version)
            self._move_champion(version, "rollback", reason or f"rollback from {record.get('version')} to {version}", history)
        return version

    def reconcile(self) -> int | None:
        """Bring ``champion.json`` and ``models.config`` in line with the champion journal
        (rolling forward a champion change that a crash cut short); returns the champion."""
        if not self.path.is_dir():
            return None
        with self._lock():
            self._reconcile()
            return self.champion()

    def write_serving_config(self) -> Path:
        """Rewrite ``<registry>/models.config`` and ``<registry>/serving.json`` from every
        model's ``champion.json`` (atomically, each only when it changes).

        ``serving.json`` (:func:`pipeline.registry.tf_serving.serving_manifest`) is written
        once some champion has a faiss serving index, and kept from then on; a registry whose
        champions were all exported before serving indexes has only ``models.config``.
        Called after every champion change; by hand (``serving-config``) for a registry
        written before these files existed.
        """
        with file_lock(self.root / MODELS_CONFIG_LOCK):
            champions = {path.parent.name: (path.parent, json.loads(path.read_text())["version"])
                         for path in sorted(self.root.glob(f"*/{CHAMPION_FILE}"))}
            target, text = self.root / MODELS_CONFIG, models_config(champions)
            if not target.is_file() or target.read_text() != text:  # unchanged: TF Serving sees no new file
                write_text(target, text)
            manifest, served = self.root / SERVING_MANIFEST, serving_manifest(champions)
            if manifest.is_file() or any(entry["serving_index"] for entry in served["models"].values()):
                text = json.dumps(served, indent=2, sort_keys=True)
                if not manifest.is_file() or manifest.read_text() != text:
                    write_text(manifest, text)
            return target

    def version_dir(self, version: int) -> Path:
        """Where ``version`` is published (a TF Serving version: the SavedModel, ``serving_index/``, ``assets.extra/``).

        Raises:
            RegistryError: When there is no such version.
        """
        self._check_version(version)
        return self.path / str(version)

    # ------------------------------------------------------------------ internals
    def _lock(self) -> contextlib.AbstractContextManager:
        """Serialise this model's writers: version numbers, champion, journals."""
        return file_lock(self.path / LOCK_FILE)

    def _check_version(self, version: int) -> None:
        if version not in self.versions():
            raise RegistryError(f"{self.model} has no version {version} (have {self.versions()})")

    def _move_champion(self, version: int, action: str, reason: str, history: list[int] | None = None, **context) -> None:
        """Under the lock: journal the change, then point the champion at ``version`` and re-pin serving.

        ``history`` replaces the rollback stack (a rollback to the previous champion pops
        it); by default the outgoing champion is pushed onto it. The journal entry is written
        first and carries the whole record, so :meth:`_reconcile` can finish a change a crash
        cut short.
        """
        record = self._champion_record() or {}
        previous = record.get("version")
        if history is None:
            history = record.get("history", []) + ([previous] if previous not in (None, version) else [])
        self._journal_champion(action, version, previous, reason=reason, history=history, **context)
        crash_point(f"{action}.journaled")
        write_json(self.path / CHAMPION_FILE, {"version": version, "history": history, "reason": reason, "at": utc_now()})
        crash_point(f"{action}.champion_written")
        self.write_serving_config()
        crash_point(f"{action}.config_written")

    def _reconcile(self) -> None:
        """Under the lock: make ``champion.json`` say what the journal's last decision says,
        then ``models.config`` what ``champion.json`` says (each rewritten only if it differs)."""
        log = [e for e in self.champion_log() if e.get("action") in ("promote", "rollback")]
        record = self._champion_record()
        if log and (record is None or record.get("version") != log[-1]["version"]):
            last = log[-1]
            previous = (record or {}).get("version")
            history = last.get("history")
            if history is None:  # an entry from before the journal carried the record
                history = (record or {}).get("history", []) + ([previous] if previous not in (None, last["version"]) else [])
            write_json(self.path / CHAMPION_FILE, {"version": last["version"], "history": history,
                                                   "reason": f"{last.get('reason', '')} (completed from the journal)", "at": utc_now()})
        if log or record is not None:
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


def _named(version) -> str:
    return "no champion" if version is None else f"version {version}"
