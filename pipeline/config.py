"""One typed configuration for every stage; it owns every default.

Run-time knobs (Airflow ``Param``s, CLI ``--config`` JSON files, test overrides) are turned
once into a frozen :class:`PipelineConfig` by :func:`load_config`; modules read fields
from it and never keep numbers of their own.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping

from pipeline.data.contract import EVENT_TYPES


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Feature extraction (``spark_jobs/extract_features.py``).

    Attributes:
        window_days: Days of raw partitions read, ending at (and including) ``ds``.
        max_quarantine_share: Fail the run when more than this share of the window's
            deduplicated events is quarantined.
        min_events: Fewest valid events a window may hold.
        event_weights: Implicit-feedback weight of one event of each type.
        val_fraction: Share of each eligible user's latest interactions held out
            for validation (at least one).
        test_fraction: Share held out for test (at least one; the very latest).
        min_user_interactions: Users with fewer interactions stay train-only.
        history_length: Items kept in a user's last-N history.
        spark_master: Spark master URL when the job starts its own session.
        shuffle_partitions: ``spark.sql.shuffle.partitions`` for the job.
    """

    window_days: int = 30
    max_quarantine_share: float = 0.01
    min_events: int = 1
    event_weights: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"view": 1.0, "click": 2.0, "add_to_cart": 3.0, "purchase": 5.0, "rate": 4.0}
    )
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    min_user_interactions: int = 5
    history_length: int = 20
    spark_master: str = "local[*]"
    shuffle_partitions: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "event_weights", dict(self.event_weights))
        _check(self.window_days >= 1, "features.window_days must be >= 1")
        _check(0.0 <= self.max_quarantine_share <= 1.0, "features.max_quarantine_share must be in [0, 1]")
        _check(self.min_events >= 1, "features.min_events must be >= 1")
        unknown = sorted(set(self.event_weights) - set(EVENT_TYPES))
        _check(not unknown, f"features.event_weights has unknown event types {unknown}; allowed: {list(EVENT_TYPES)}")
        missing = sorted(set(EVENT_TYPES) - set(self.event_weights))
        _check(not missing, f"features.event_weights lacks a weight for {missing}")
        _check(all(w > 0 for w in self.event_weights.values()), "features.event_weights must all be > 0")
        _check(0.0 < self.val_fraction < 0.5, "features.val_fraction must be in (0, 0.5)")
        _check(0.0 < self.test_fraction < 0.5, "features.test_fraction must be in (0, 0.5)")
        _check(self.min_user_interactions >= 3, "features.min_user_interactions must be >= 3")
        _check(self.history_length >= 1, "features.history_length must be >= 1")
        _check(self.shuffle_partitions >= 1, "features.shuffle_partitions must be >= 1")

    def window(self, ds: dt.date) -> tuple[dt.date, dt.date]:
        """First and last day (both inclusive) of the window ending at ``ds``."""
        return ds - dt.timedelta(days=self.window_days - 1), ds


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """One two-tower retrieval model (teacher or student).

    Attributes:
        embedding_dim: Width of the user-id, item-id and history item embeddings.
        side_dim: Width of each side-feature embedding (age, gender, occupation, year, category).
        hidden_units: Hidden layers of each tower's MLP; the last hidden layer is the 'hint' layer.
        output_dim: Width of the final user and item embeddings (their dot product is the score).
        dropout: Dropout after each hidden layer while training.
        l2: L2 penalty on embeddings and kernels.
        normalize: L2-normalise the output embeddings (scores become cosines).
    """

    embedding_dim: int = 128
    side_dim: int = 16
    hidden_units: tuple[int, ...] = (256, 128)
    output_dim: int = 128
    dropout: float = 0.1
    l2: float = 1e-5
    normalize: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_units", tuple(int(h) for h in self.hidden_units))
        _check(self.embedding_dim >= 1 and self.side_dim >= 1 and self.output_dim >= 1, "tower dims must be >= 1")
        _check(all(h >= 1 for h in self.hidden_units), "tower hidden_units must be >= 1")
        _check(0.0 <= self.dropout < 1.0, "tower dropout must be in [0, 1)")
        _check(self.l2 >= 0.0, "tower l2 must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training of the teacher and the students.

    Attributes:
        teacher: Teacher architecture.
        student: Student architecture (at most 10% of the teacher's parameters).
        batch_size: Interactions per step (the in-batch negatives of the hard loss).
        learning_rate: Adam learning rate.
        teacher_epochs: Most teacher epochs; early stopping picks the best on validation.
        student_epochs: Student epochs, the same with and without distillation.
        patience: Epochs without validation improvement before stopping.
        shuffle_buffer: Interactions held by the streaming shuffle buffer.
        seed: Seed of every random choice in training.
        temperature: Distillation temperature T.
        alpha: Weight of the hard (true-interaction) loss; 1 - alpha weighs the soft loss.
            The default 0 (soft targets and hints only) had the best validation scores on
            ML-100K among alpha 0, 0.1, 0.2, 0.5 (see README, "what was tried").
        beta: Weight of the hint (intermediate-layer MSE) loss.
        soft_loss: ``"kl"`` (softened teacher scores) or ``"ranking"`` (teacher top-K as
            position-weighted positives, as in Ranking Distillation).
        ranking_decay: Position-weight decay of the ranking loss, ``w_k ~ exp(-k / decay)``.
        sampled_negatives: Uniformly sampled items added to each user's teacher candidates.
        top_k: Teacher candidates per user in the soft targets.
        early_stopping_k: K of the validation Recall@K that early stopping watches.
        logq_correction: Correct the in-batch softmax for popular items' over-sampling.
        retrieval_temperature: Divides every model's scores to make logits, in the hard
            loss and in distillation (with normalised embeddings scores are cosines).
    """

    teacher: TowerConfig = dataclasses.field(default_factory=TowerConfig)
    student: TowerConfig = dataclasses.field(
        default_factory=lambda: TowerConfig(embedding_dim=16, side_dim=4, hidden_units=(32,), output_dim=32, dropout=0.0, l2=0.0)
    )
    batch_size: int = 1024
    learning_rate: float = 0.003
    teacher_epochs: int = 30
    student_epochs: int = 20
    patience: int = 4
    shuffle_buffer: int = 50_000
    seed: int = 42
    temperature: float = 2.0
    alpha: float = 0.0
    beta: float = 0.1
    soft_loss: str = "kl"
    ranking_decay: float = 10.0
    sampled_negatives: int = 100
    top_k: int = 100
    early_stopping_k: int = 20
    logq_correction: bool = True
    retrieval_temperature: float = 0.05

    def __post_init__(self) -> None:
        _check(self.retrieval_temperature > 0, "train.retrieval_temperature must be > 0")
        _check(self.batch_size >= 2, "train.batch_size must be >= 2")
        _check(self.learning_rate > 0, "train.learning_rate must be > 0")
        _check(self.teacher_epochs >= 1 and self.student_epochs >= 1, "train epochs must be >= 1")
        _check(self.patience >= 1, "train.patience must be >= 1")
        _check(self.temperature > 0, "train.temperature must be > 0")
        _check(0.0 <= self.alpha <= 1.0, "train.alpha must be in [0, 1]")
        _check(self.beta >= 0.0, "train.beta must be >= 0")
        _check(self.soft_loss in ("kl", "ranking"), f"train.soft_loss must be 'kl' or 'ranking', got {self.soft_loss!r}")
        _check(self.ranking_decay > 0, "train.ranking_decay must be > 0")
        _check(self.sampled_negatives >= 0, "train.sampled_negatives must be >= 0")
        _check(self.top_k >= 1, "train.top_k must be >= 1")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation harness and baselines.

    Attributes:
        ks: Cut-offs of Recall and NDCG.
        batch_size: Users scored per batch.
        als_rank: Spark MLlib ALS factors.
        als_reg: ALS regularisation.
        als_alpha: ALS implicit-feedback confidence scale.
        als_iterations: ALS sweeps.
        latency_batch_size: Users per batched top-K query when timing a SavedModel.
        latency_repeats: Timed batches (after warm-up) per model.
    """

    ks: tuple[int, ...] = (10, 20)
    batch_size: int = 512
    als_rank: int = 64
    als_reg: float = 0.1
    als_alpha: float = 0.5
    als_iterations: int = 15
    latency_batch_size: int = 256
    latency_repeats: int = 30

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        _check(all(k >= 1 for k in self.ks), "evaluate.ks must be >= 1")


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Validation gate between a distilled student and the model registry.

    A change is ``(student - reference) / reference`` when ``mode="relative"`` and
    ``student - reference`` when ``"absolute"``; a check passes when the change is at
    least the (signed) minimum: ``-0.05`` lets the student be up to 5% below.

    Attributes:
        metrics: Gated test metrics.
        mode: ``"relative"`` or ``"absolute"`` for both references.
        min_change_vs_teacher: Signed minimum change against the teacher.
        min_change_vs_champion: Signed minimum change against the serving champion
            (skipped, with a warning, when there is no champion yet).
        floors: Optional absolute minimum per metric, e.g. ``{"ndcg@10": 0.05}``.
    """

    metrics: tuple[str, ...] = ("ndcg@10", "recall@20")
    mode: str = "relative"
    min_change_vs_teacher: float = -0.05
    min_change_vs_champion: float = -0.02
    floors: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "floors", dict(self.floors))
        _check(len(self.metrics) >= 1, "gate.metrics must name at least one metric")
        _check(self.mode in ("relative", "absolute"), f"gate.mode must be 'relative' or 'absolute', got {self.mode!r}")
        unknown = sorted(set(self.floors) - set(self.metrics))
        _check(not unknown, f"gate.floors names metrics that are not gated: {unknown}")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Every stage's settings."""

    features: FeatureConfig = dataclasses.field(default_factory=FeatureConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    evaluate: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    gate: GateConfig = dataclasses.field(default_factory=GateConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (mappings turned back into plain dicts)."""
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Short, stable hash of the settings, for lineage and idempotence checks."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class DataPaths:
    """Where each stage reads and writes, all under one data root."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def soft_targets(self) -> Path:
        return self.root / "soft_targets"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _build(default: Any, values: Mapping[str, Any], prefix: str) -> Any:
    """``default`` (a config dataclass instance) with ``values`` applied, checked and coerced."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix} must be a JSON object, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(default)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown setting(s) {[f'{prefix}.{k}' for k in unknown]}; known: {sorted(names)}")
    changes = {}
    for name, value in values.items():
        current = getattr(default, name)
        if dataclasses.is_dataclass(current):
            changes[name] = _build(current, value, f"{prefix}.{name}")
        else:
            changes[name] = _coerce(value, current, f"{prefix}.{name}")
    return dataclasses.replace(default, **changes)


def _coerce(value: Any, default: Any, name: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if isinstance(default, int) and not float(value).is_integer():
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        return type(default)(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return tuple(value)
    if isinstance(default, Mapping) and not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be an object, got {value!r}")
    return value


def load_config(overrides: Mapping[str, Any] | None = None, path: str | Path | None = None) -> PipelineConfig:
    """Build the pipeline config from defaults, an optional JSON file, then overrides.

    Args:
        overrides: Nested settings, e.g. ``{"features": {"window_days": 7}}``; applied last.
        path: A JSON file of nested settings.

    Returns:
        The frozen config.

    Raises:
        ConfigError: On an unknown key, a value of the wrong type or out of range.
    """
    merged: dict[str, Any] = {}
    if path is not None:
        try:
            merged = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from err
    for section, values in (overrides or {}).items():
        if isinstance(values, Mapping) and isinstance(merged.get(section), Mapping):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return _build(PipelineConfig(), merged, "config")


def parse_ds(value: str) -> dt.date:
    """Parse a logical date ``YYYY-MM-DD``.

    Raises:
        ConfigError: When ``value`` is not such a date.
    """
    text = str(value)
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise ValueError(text)
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"ds must be a date YYYY-MM-DD, got {value!r}") from None
