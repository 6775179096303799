"""The typed records the catalogue loads and saves: a model's ``metadata.json``, a feature
set's ``manifest.json`` and the soft targets' ``manifest.json``.

Each record names the fields the pipeline reads; keys it does not name (older or newer
writers') are kept in ``extra`` and written back unchanged, so a load and a save never lose
what a file says. Loading a directory without its file raises :class:`ArtifactNotFound`
saying which step writes it; a file missing a named field raises :class:`RecordError` naming
the file and the field. Saving goes through :func:`pipeline.io.write_json` (atomic).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, Mapping, TypeVar

from pipeline.io import write_json

MANIFEST = "manifest.json"
METADATA = "metadata.json"

R = TypeVar("R", bound="Record")


class ArtifactNotFound(FileNotFoundError):
    """An artifact a step needs has not been published (run the step that writes it first)."""


class RecordError(ValueError):
    """A record file that cannot be read as its record (not JSON, or a field missing)."""


@dataclasses.dataclass(frozen=True)
class Record:
    """Base of the records: ``FILE`` inside an artifact directory, ``WHAT`` and ``HINT`` for errors."""

    FILE: ClassVar[str]
    WHAT: ClassVar[str]
    HINT: ClassVar[str]

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any], source: str = "record") -> R:
        """The record of ``data``; keys the record does not name go to ``extra``.

        Raises:
            RecordError: When a field without a default is missing.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = [f.name for f in dataclasses.fields(cls) if f.name != "extra"
                    and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise RecordError(f"{source}: missing field(s) {', '.join(missing)} of a {cls.WHAT} {cls.FILE}")
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        """The record as its file holds it (``extra`` merged back, unset optional fields left out)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **{k: v for k, v in fields.items() if v is not None}}

    @classmethod
    def load(cls: type[R], directory: str | Path) -> R:
        """The record in ``directory``.

        Raises:
            ArtifactNotFound: When ``directory`` holds no ``FILE`` (the step that writes it has not run).
            RecordError: When the file is not a JSON object or misses a field.
        """
        path = Path(directory) / cls.FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ArtifactNotFound(f"no {cls.WHAT} at {directory} ({cls.FILE} missing): {cls.HINT}") from None
        try:
            data = json.loads(text)
        except ValueError as error:
            raise RecordError(f"{path}: not JSON ({error})") from None
        if not isinstance(data, dict):
            raise RecordError(f"{path}: a JSON object expected, got {type(data).__name__}")
        return cls.from_dict(data, str(path))

    @classmethod
    def exists(cls, directory: str | Path) -> bool:
        """Whether ``directory`` holds a published record (the artifact's marker file)."""
        return (Path(directory) / cls.FILE).is_file()

    def save(self, directory: str | Path) -> Path:
        """Write the record into ``directory`` atomically."""
        return write_json(Path(directory) / self.FILE, self.to_dict())


@dataclasses.dataclass(frozen=True)
class ModelMetadata(Record):
    """A model export's ``metadata.json``: what it is, what it learnt from and how it trained."""

    FILE: ClassVar[str] = METADATA
    WHAT: ClassVar[str] = "model export"
    HINT: ClassVar[str] = "run the step that trains it (train_teacher or distill) first"

    version: str
    ds: str
    role: str
    config: dict
    config_hash: str
    trainable_params: int
    metrics: dict
    best_epoch: int
    history: list
    seconds: float
    features: str | None = None
    tensorboard: str | None = None  # its TensorBoard logs, relative to the model's directory
    refit: dict | None = None
    teacher_version: str | None = None  # students: the teacher whose soft targets they learnt from
    warm_start: dict | None = None  # the model it started from ({"from", "version", "ds", counts}) or {"cold": why}
    soft_targets: str | None = None
    # Refitted models: their selection run's weights (trained on train only), relative to the model's directory.
    selection_checkpoint: str | None = None
    # Students: ``{phase: {"path", "teacher_weights"}}``, the soft targets each training phase learnt from.
    soft_targets_by_phase: dict | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def refitted(self) -> bool:
        """Whether it last trained on train + validation."""
        return bool(self.config.get("training", {}).get("refit"))


@dataclasses.dataclass(frozen=True)
class FeatureManifest(Record):
    """A feature set's ``manifest.json`` (written by the feature job): window, inputs, counts,
    each table's rows and schema, the GX results, the settings."""

    FILE: ClassVar[str] = MANIFEST
    WHAT: ClassVar[str] = "published features"
    HINT: ClassVar[str] = "run extract_features first"

    ds: str
    counts: dict
    tables: dict
    config: dict
    validation: dict | None = None  # each GX suite's result
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def interactions_by_split(self) -> dict[str, int]:
        """Interactions per split (train, validation, test)."""
        return self.counts["interactions_by_split"]

    @property
    def table_rows(self) -> dict[str, int]:
        """Rows of each table."""
        return {name: table["rows"] for name, table in self.tables.items()}


@dataclasses.dataclass(frozen=True)
class SoftTargetManifest(Record):
    """The soft targets' ``manifest.json``: whose they are, K, the embedding width, the logit scale."""

    FILE: ClassVar[str] = MANIFEST
    WHAT: ClassVar[str] = "soft targets"
    HINT: ClassVar[str] = "run soft_targets first"

    ds: str
    teacher_version: str
    k: int
    dim: int
    logit_scale: float
    users: int
    items: int
    teacher_dir: str | None = None
    features: str | None = None
    engine: str | None = None
    teacher_weights: str | None = None  # the teacher's checkpoint directory that scored them
    known_splits: list | None = None  # the splits whose items were excluded (what that teacher trained on)
    selection_set: str | None = None  # main set of a refitted teacher: the sub-directory of its selection run's set
    extra: dict = dataclasses.field(default_factory=dict)
