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
import re
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig, TrainingConfig, load_config, stable_hash
from pipeline.data.contract import PARTITION_KEY, SIDE_TABLES, event_partition_dir, side_table_dir, window_days
from pipeline.data_root import (DATA_ROOT_ENV, OutsideDataRoot, configured_data_root, confine, confine_raw_window,  # noqa: F401
                                confine_tree, run_data_root)
from pipeline.records import (METADATA, MANIFEST, ArtifactNotFound, FeatureManifest, ModelMetadata,  # noqa: F401 (re-exported)
                              RecordError, SoftTargetManifest)

REPO_ROOT = Path(__file__).resolve().parents[1]
STUDENT_ROLES = ("student", "student_plain")
# A model directory's TensorBoard logs, one run per training phase below it (recorded in its metadata).
TENSORBOARD = "tensorboard"
# Below a refitted teacher's soft targets: those of its selection run, which never saw validation.
SELECTION_SOFT_TARGETS = "selection"


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


# What "the same settings" means for warm start: every section a model's training depends on,
# but not how a night starts (the warm-start switch and policy): a model trained cold, or under
# another warm policy, is as good a start as one trained warm under tonight's.
WARM_START_SECTIONS = {"teacher": ("features", "training", "teacher", "serving"),
                       "student": ("features", "training", "teacher", "student", "distill", "soft_targets", "serving")}
WARM_START_POLICY = ("warm_start", "warm_learning_rate_scale", "warm_patience", "warm_keep")


def warm_start_identity(cfg: PipelineConfig, role: str, policy: bool = False) -> str:
    """The hash two models of ``role`` share when one may warm-start the other; with ``policy``,
    the warm-start policy counts too."""
    sections = WARM_START_SECTIONS["teacher" if role == "teacher" else "student"]
    if policy:
        return cfg.section_hash(*sections)
    neutral = dataclasses.replace(cfg.training, **{name: getattr(TrainingConfig, name) for name in WARM_START_POLICY})
    return dataclasses.replace(cfg, training=neutral).section_hash(*sections)


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
        inputs = {"features": features_identity(self.feature_manifest(ds)), **self._warm_from("teacher", ds, cfg)}
        return f"{ds}-{cfg.section_hash('training', 'teacher', 'serving', inputs=inputs)[:10]}"

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
        inputs = {"soft_targets": self.soft_targets_version(ds, cfg), **self._warm_from(role, ds, cfg)}
        identity = cfg.section_hash("training", "student", "distill", "serving", inputs=inputs)[:10]
        return self.confine(self.models_root / role / f"{ds}-{identity}")

    # ------------------------------------------------------------------ warm start
    def previous_model(self, role: str, ds: str, cfg: PipelineConfig) -> Path | None:
        """The newest model of ``role`` exported for a date before ``ds`` with the same
        settings as ``cfg`` (every section its training depends on), found by the metadata
        each export records; None when there is none (the first night, or new settings). How a
        night starts (:data:`WARM_START_POLICY`) does not count; of two models of the same date,
        the one whose warm-start policy is tonight's too comes first."""
        wanted, exact, found = warm_start_identity(cfg, role), warm_start_identity(cfg, role, policy=True), None
        root = self.models_root / role
        for directory in sorted(root.iterdir()) if root.is_dir() else []:
            if directory.name.startswith(".") or not ModelMetadata.exists(directory):
                continue
            try:
                meta = ModelMetadata.load(directory)
                settings = load_config(meta.config)
                same = warm_start_identity(settings, role) == wanted
                rank = (meta.ds, warm_start_identity(settings, role, policy=True) == exact)
            except (RecordError, ConfigError, TypeError, ValueError):  # another code version's record: not ours
                continue
            if same and meta.ds < ds and (found is None or rank > found[0]):
                found = (rank, directory)
        return self.confine(found[1]) if found else None

    def _warm_from(self, role: str, ds: str, cfg: PipelineConfig) -> dict:
        """A warm model's identity input: the model it starts from (none for a cold start)."""
        previous = self.previous_model(role, ds, cfg) if cfg.training.warm_start else None
        return {"warm_from": previous.name} if previous else {}

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
