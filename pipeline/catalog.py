"""The artifact catalogue: where every artifact lives, how it is named, how a run finds it.

Layout under one data root::

    raw/                                        the raw event logs (pipeline.data.contract)
    features/<features version>/ds=<ds>/        one feature set of a logical date (manifest.json)
    features/<features version>/_validation/ds=<ds>/   GX Data Docs of that feature job
    models/teacher/<ds>-<identity>/             a teacher export (saved_model/, checkpoint/, metadata.json,
                                                tensorboard/: its training's TensorBoard logs)
    soft_targets/ds=<ds>/<identity>/            the teacher's batch soft targets (selection/: those of a
                                                refitted teacher's selection run, for a student's own)
    models/student/<ds>-<identity>/             a distilled student
    models/student_plain/<ds>-<identity>/       the same student trained without distillation
    registry/<model>/                           promoted versions (pipeline.registry)
    registry/models.config                      TF Serving config pinning each model to its champion
    reports/ds=<ds>/<run key>/<run id>/         run reports, one per attempt

An artifact's identity is a hash of the configuration sections it depends on and of its
inputs' identities (recorded lineage, as TFX's resolver does), so the artifact "for this
run" is found by computing that identity, never by picking the newest directory:

* features: ``ds``, the ``features`` settings and the raw window's identity (every file it
  reads, by path, size and modification time) make the *features version*, fixed when a
  run is resolved (:meth:`Catalog.for_run`), so runs with other settings or other raw
  files never share or overwrite a feature set; what is built on features hashes their
  manifest (window, inputs, counts, settings);
* teacher: features + ``training``, ``teacher``, ``serving``;
* soft targets: teacher + ``soft_targets``;
* student: soft targets + ``training``, ``student``, ``distill``, ``serving``.

Re-running the same ``ds`` with the same settings therefore rewrites the same artifacts,
and changing a setting that an artifact depends on gives it a new identity.

Every path the catalogue hands out must resolve, symlinks followed, inside its allowed root
(the data root, or ``$RECSYS_DATA_ROOT`` for a run): a symlink that stays inside is fine,
one that leaves it (``raw -> /elsewhere``, ``features/ds=... -> /elsewhere``) raises
:class:`OutsideDataRoot` at the step that would use it. The path handed out is the one
asked for, not its resolution, so directory names (an artifact's version) keep their meaning.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import re
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig, stable_hash
from pipeline.data.contract import PARTITION_KEY, SIDE_TABLES, event_partition_dir, side_table_dir, window_days, window_partitions
from pipeline.records import (METADATA, MANIFEST, ArtifactNotFound, FeatureManifest, ModelMetadata,  # noqa: F401 (re-exported)
                              SoftTargetManifest)

DATA_ROOT_ENV = "RECSYS_DATA_ROOT"
REPO_ROOT = Path(__file__).resolve().parents[1]
STUDENT_ROLES = ("student", "student_plain")
# A model directory's TensorBoard logs, one run per training phase below it (recorded in its metadata).
TENSORBOARD = "tensorboard"
# Below a refitted teacher's soft targets: those of its selection run, which never saw validation.
SELECTION_SOFT_TARGETS = "selection"


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


def date_partition(root: str | Path, ds: str) -> Path:
    """``<root>/ds=<ds>``: how every dated artifact is partitioned."""
    return Path(root) / f"{PARTITION_KEY}={ds}"


def validation_docs(features_root: str | Path, ds: str) -> Path:
    """Where the feature job of ``ds`` writes its GX Data Docs (and quarantine on failure)."""
    return date_partition(Path(features_root) / "_validation", ds)


def raw_window_identity(raw_root: str | Path, window_start: dt.date, window_end: dt.date) -> list:
    """What the feature job of a window reads, file by file: ``[path, bytes, mtime_ns]`` of
    every file under the window's event partitions and the side tables (missing ones skipped:
    the pre-flight check reports them). A rewritten file counts as a new input."""
    raw_root = Path(raw_root)
    directories = [*(event_partition_dir(raw_root, day) for day in window_days(window_start, window_end)),
                   *(side_table_dir(raw_root, name) for name in SIDE_TABLES)]
    files = sorted(f for d in directories if d.is_dir() for f in d.rglob("*") if f.is_file())
    return [[str(f.relative_to(raw_root)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def features_version(raw_root: str | Path, ds: str, cfg: PipelineConfig) -> str:
    """The identity of the feature set that ``cfg`` builds for ``ds`` from the raw files as
    they are now: ``ds``, the ``features`` settings and :func:`raw_window_identity`."""
    window = cfg.features.window(dt.date.fromisoformat(ds))
    return stable_hash({"ds": ds, "features": dataclasses.asdict(cfg.features), "raw": raw_window_identity(raw_root, *window)})[:12]


def features_identity(manifest: FeatureManifest) -> str:
    """The identity of a published feature set: a hash of its manifest."""
    return stable_hash(manifest.to_dict())


@dataclasses.dataclass(frozen=True)
class Catalog:
    """Every artifact path under one data root, found by meaning and by lineage.

    Every path it hands out is checked with :func:`confine` first, so a step never reads or
    writes outside ``allowed``; :meth:`confine` checks the paths a step got elsewhere (an
    upstream task's result, a registry version).

    Attributes:
        root: The data root.
        allowed: The root every path must resolve inside; the data root itself by default.
        features_version: The run's feature set (see :func:`features_version`); None: the
            unversioned ``features/ds=<ds>/`` of a feature job run by hand with ``--out features``.

    Raises:
        OutsideDataRoot: From any path it would hand out that resolves outside ``allowed``.
    """

    root: Path
    allowed: Path | None = None
    features_version: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "allowed", self.root if self.allowed is None else Path(self.allowed))

    def for_run(self, ds: str, cfg: PipelineConfig) -> "Catalog":
        """This catalogue with the feature set that ``cfg`` builds for ``ds`` from the raw files as they are now."""
        return dataclasses.replace(self, features_version=features_version(self.raw, ds, cfg))

    def confine(self, path: str | Path) -> Path:
        """``path`` once it resolves inside the allowed root (see :func:`confine`)."""
        return confine(path, self.allowed)

    def confine_tree(self, directory: str | Path) -> Path:
        """``directory`` once it and everything below it resolve inside the allowed root (see :func:`confine_tree`)."""
        return confine_tree(directory, self.allowed)

    # ------------------------------------------------------------------ roots
    @property
    def raw(self) -> Path:
        return self.confine(self.root / "raw")

    @property
    def features_root(self) -> Path:
        return self.confine(self.root / "features")

    @property
    def features_home(self) -> Path:
        """Where the run's feature job writes: ``features/<features version>`` (the feature job's ``--out``)."""
        home = self.root / "features"
        return self.confine(home / self.features_version if self.features_version else home)

    @property
    def models_root(self) -> Path:
        return self.confine(self.root / "models")

    @property
    def soft_targets_root(self) -> Path:
        return self.confine(self.root / "soft_targets")

    @property
    def registry_root(self) -> Path:
        return self.confine(self.root / "registry")

    @property
    def reports_root(self) -> Path:
        return self.confine(self.root / "reports")

    # ------------------------------------------------------------------ raw and features
    def features(self, ds: str) -> Path:
        """The published feature set of ``ds``.

        Raises:
            ArtifactNotFound: When the feature job has not published it.
        """
        path = self.confine(date_partition(self.features_home, ds))
        if not self.confine(path / MANIFEST).is_file():
            raise ArtifactNotFound(f"no published features at {path} ({MANIFEST} missing): run extract_features for ds={ds} first")
        return path

    def feature_manifest(self, ds: str) -> FeatureManifest:
        """The manifest of the published feature set of ``ds``."""
        return FeatureManifest.load(self.features(ds))

    def validation_docs(self, ds: str) -> Path:
        """The GX Data Docs of the feature job of ``ds``."""
        return self.confine(validation_docs(self.features_home, ds))

    # ------------------------------------------------------------------ models and soft targets
    def teacher_version(self, ds: str, cfg: PipelineConfig) -> str:
        """``<ds>-<identity>`` of the teacher that ``cfg`` trains on the features of ``ds``."""
        features = features_identity(self.feature_manifest(ds))
        return f"{ds}-{cfg.section_hash('training', 'teacher', 'serving', inputs={'features': features})[:10]}"

    def teacher(self, ds: str, cfg: PipelineConfig) -> Path:
        """The teacher directory for ``ds`` and ``cfg`` (it may not exist yet)."""
        return self.confine(self.models_root / "teacher" / self.teacher_version(ds, cfg))

    def soft_targets_version(self, ds: str, cfg: PipelineConfig) -> str:
        """The identity of the soft targets that ``cfg``'s teacher writes for ``ds``."""
        return cfg.section_hash("soft_targets", inputs={"teacher": self.teacher_version(ds, cfg)})[:12]

    def soft_targets(self, ds: str, cfg: PipelineConfig) -> Path:
        """The soft targets that ``cfg``'s teacher writes for ``ds`` (they may not exist yet)."""
        return self.confine(date_partition(self.soft_targets_root, ds) / self.soft_targets_version(ds, cfg))

    def selection_soft_targets(self, ds: str, cfg: PipelineConfig) -> Path:
        """The soft targets a student's selection run learns from: with ``training.refit``, those
        of the teacher's selection run (below the main set), else the main set itself."""
        main = self.soft_targets(ds, cfg)
        return self.confine(main / SELECTION_SOFT_TARGETS) if cfg.training.refit else main

    def student(self, ds: str, cfg: PipelineConfig, role: str = "student") -> Path:
        """The student directory for ``ds`` and ``cfg`` (``role``: distilled or plain)."""
        if role not in STUDENT_ROLES:
            raise ValueError(f"role must be one of {STUDENT_ROLES}, got {role!r}")
        cfg = cfg.rung(cfg.student.max_param_share)  # a rung's identity: its own budget, not the whole ladder
        inputs = {"soft_targets": self.soft_targets_version(ds, cfg)}
        identity = cfg.section_hash("training", "student", "distill", "serving", inputs=inputs)[:10]
        return self.confine(self.models_root / role / f"{ds}-{identity}")

    def model_metadata(self, model_dir: str | Path) -> ModelMetadata:
        """The metadata of the model exported at ``model_dir`` (inside the data root).

        Raises:
            ArtifactNotFound: When nothing has been exported there.
        """
        return ModelMetadata.load(self.confine(model_dir))

    def soft_target_manifest(self, soft_targets_dir: str | Path) -> SoftTargetManifest:
        """The manifest of the soft targets at ``soft_targets_dir`` (inside the data root)."""
        return SoftTargetManifest.load(self.confine(soft_targets_dir))

    # ------------------------------------------------------------------ runs
    def report(self, ds: str, run_key: str, run_id: str) -> Path:
        """The report directory of one run attempt (``run_key``: its date and settings;
        ``run_id``: the attempt), so a re-run adds a report and never rewrites an earlier one."""
        return self.confine(date_partition(self.reports_root, ds) / run_key / _attempt_name(run_id))

    def reports_of(self, run_id: str) -> list[Path]:
        """Every report directory of the run ``run_id`` (one per ``run_key`` it wrote), found by the
        name :meth:`report` gives its attempt, never by a path recorded elsewhere."""
        found = sorted(self.reports_root.glob(f"{PARTITION_KEY}=*/*/{_glob_escape(_attempt_name(run_id))}"))
        return [self.confine(path) for path in found if path.is_dir()]


def _attempt_name(run_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)
    return f"{safe}-{hashlib.sha1(run_id.encode()).hexdigest()[:8]}"


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def require(path: Path, marker: str, what: str, hint: str) -> Path:
    """``path`` if ``path / marker`` exists, else :class:`ArtifactNotFound` saying what to run.

    Args:
        path: The artifact directory the catalogue resolved.
        marker: The file a published artifact always holds (``metadata.json``, ``manifest.json``).
        what: The artifact, for the message.
        hint: Which step writes it.
    """
    if not (path / marker).is_file():
        raise ArtifactNotFound(f"no {what} at {path}: {hint}")
    return path
