"""The settings of every stage, one frozen dataclass per section; they own every default."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from typing import Any, Mapping

from pipeline.config.checks import ConfigError, _check  # noqa: F401  (ConfigError is re-exported)
from pipeline.config.evaluation import EvalConfig, GateConfig
from pipeline.config.serving import ServingConfig  # noqa: F401  (re-exported)
from pipeline.data.contract import EVENT_TYPES


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
        max_user_interactions: Most interactions (distinct items) kept per user, the
            latest; the rest are dropped and counted in the manifest. Bounds per-user work
            (one task holds one user's interactions), whatever a bot does.
        spark_master: Spark master URL when the job starts its own session.
        shuffle_partitions: ``spark.sql.shuffle.partitions`` for the job.
        driver_memory: ``spark.driver.memory`` when the job starts its own JVM (local
            mode runs the executors in the driver, so this is all of the job's heap);
            under ``spark-submit`` its ``--driver-memory`` applies instead.
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
    max_user_interactions: int = 10_000
    spark_master: str = "local[*]"
    shuffle_partitions: int = 8
    driver_memory: str = "4g"

    def __post_init__(self) -> None:
        object.__setattr__(self, "event_weights", dict(self.event_weights))
        _check(self.window_days >= 1, f"features.window_days must be >= 1, got {self.window_days!r}")
        _check(0.0 <= self.max_quarantine_share <= 1.0,
               f"features.max_quarantine_share must be in [0, 1], got {self.max_quarantine_share!r}")
        _check(self.min_events >= 1, f"features.min_events must be >= 1, got {self.min_events!r}")
        unknown = sorted(set(self.event_weights) - set(EVENT_TYPES))
        _check(not unknown, f"features.event_weights has unknown event types {unknown}; allowed: {list(EVENT_TYPES)}")
        missing = sorted(set(EVENT_TYPES) - set(self.event_weights))
        _check(not missing, f"features.event_weights lacks a weight for {missing}")
        _check(all(w > 0 for w in self.event_weights.values()), f"features.event_weights must all be > 0, got {self.event_weights!r}")
        _check(0.0 < self.val_fraction < 0.5, f"features.val_fraction must be in (0, 0.5), got {self.val_fraction!r}")
        _check(0.0 < self.test_fraction < 0.5, f"features.test_fraction must be in (0, 0.5), got {self.test_fraction!r}")
        _check(self.min_user_interactions >= 3, f"features.min_user_interactions must be >= 3, got {self.min_user_interactions!r}")
        _check(self.history_length >= 1, f"features.history_length must be >= 1, got {self.history_length!r}")
        _check(self.max_user_interactions >= self.min_user_interactions,
               f"features.max_user_interactions ({self.max_user_interactions!r}) must be >= features.min_user_interactions "
               f"({self.min_user_interactions!r})")
        _check(self.shuffle_partitions >= 1, f"features.shuffle_partitions must be >= 1, got {self.shuffle_partitions!r}")
        _check(re.fullmatch(r"[1-9][0-9]*[kmgt]", self.driver_memory) is not None,
               f"features.driver_memory must look like 512m or 4g, got {self.driver_memory!r}")

    def window(self, ds: dt.date) -> tuple[dt.date, dt.date]:
        """First and last day (both inclusive) of the window ending at ``ds``."""
        return ds - dt.timedelta(days=self.window_days - 1), ds


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """How the teacher and the students are trained (shared, so their comparison is fair).

    Attributes:
        batch_size: Interactions per step (the in-batch negatives of the hard loss).
        learning_rate: Adam learning rate.
        patience: Epochs without validation improvement before stopping.
        shuffle_buffer: Interactions held by the streaming shuffle buffer.
        seed: Seed of every random choice in training.
        early_stopping_k: K of the validation Recall@K that early stopping watches.
        logq_correction: Correct the in-batch softmax for popular items' over-sampling.
        full_softmax_max_items: Train with a softmax over the whole catalogue (no sampling
            bias) when it has at most this many items; above, in-batch negatives with logQ
            correction. 0 always uses in-batch negatives. Its cost per batch grows with the
            catalogue (every item goes through the candidate tower each batch).
        retrieval_temperature: Divides every model's scores to make logits, in the hard
            loss and in distillation (with normalised embeddings scores are cosines).
        causal_history: Each train pair's query sees only the items its user touched
            before it, as at serving time (where the history ends before the items to
            recommend). False: every pair sees the user's latest history, its own item included.
        refit: After early stopping on validation has chosen the number of epochs, train a
            fresh model (same seed) on train + validation for that many epochs and export
            it: the exported model knows the newest interactions before the test split.
            Validation metrics in the metadata are the selection run's.
        warm_start: Start each model from the previous night's model of the same settings,
            each phase from that night's weights of the same phase (the selection run from its
            selection run, trained on train only; the refit from its exported model), id
            embeddings matched by id (:mod:`pipeline.modeling.warm_start`); cold when there is none. A warm model's identity includes the model it started from.
        warm_learning_rate_scale: A phase that starts warm trains at ``learning_rate`` times
            this (its optimiser starts afresh either way); 1, the default: lower rates did not
            help on validation (bench/nights.py).
        warm_patience: Early-stopping patience of a selection run that starts warm (it starts
            near its best epoch); ``patience`` for a cold one.
        warm_keep: Share of last night's value in each weight a warm start copies, the rest
            its fresh initial value ("shrink and perturb": a converged model trained on
            generalises worse than a fresh one); 1: last night's weights as they were.
    """

    batch_size: int = 1024
    learning_rate: float = 0.003
    patience: int = 4
    shuffle_buffer: int = 50_000
    seed: int = 42
    early_stopping_k: int = 20
    logq_correction: bool = True
    full_softmax_max_items: int = 5_000
    retrieval_temperature: float = 0.05
    causal_history: bool = True
    refit: bool = True
    warm_start: bool = True
    # The warm policy chosen on validation by bench/nights.py (2026-12-05: bench/README.md).
    warm_learning_rate_scale: float = 1.0
    warm_patience: int = 2
    warm_keep: float = 0.5

    def __post_init__(self) -> None:
        _check(self.batch_size >= 2, f"training.batch_size must be >= 2, got {self.batch_size!r}")
        _check(self.learning_rate > 0, f"training.learning_rate must be > 0, got {self.learning_rate!r}")
        _check(self.patience >= 1, f"training.patience must be >= 1, got {self.patience!r}")
        _check(self.warm_learning_rate_scale > 0,
               f"training.warm_learning_rate_scale must be > 0, got {self.warm_learning_rate_scale!r}")
        _check(self.warm_patience >= 1, f"training.warm_patience must be >= 1, got {self.warm_patience!r}")
        _check(0.0 < self.warm_keep <= 1.0, f"training.warm_keep must be in (0, 1], got {self.warm_keep!r}")
        _check(self.early_stopping_k >= 1, f"training.early_stopping_k must be >= 1, got {self.early_stopping_k!r}")
        _check(self.full_softmax_max_items >= 0, f"training.full_softmax_max_items must be >= 0, got {self.full_softmax_max_items!r}")
        _check(self.retrieval_temperature > 0, f"training.retrieval_temperature must be > 0, got {self.retrieval_temperature!r}")


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """One two-tower retrieval model (teacher or student) and how long it trains.

    Attributes:
        embedding_dim: Width of the user-id, item-id and history item embeddings.
        side_dim: Width of each side-feature embedding (age, gender, occupation, year, category).
        hidden_units: Hidden layers of each tower's MLP; the last hidden layer is the 'hint' layer.
        output_dim: Width of the final user and item embeddings (their dot product is the score).
        dropout: Dropout after each hidden layer while training.
        l2: L2 penalty on embeddings and kernels, added to the batch-mean loss (the teacher's
            1e-8 is the 1e-5 chosen on validation under TFRS's batch-sum loss, divided by the
            batch of 1,024).
        normalize: L2-normalise the output embeddings (scores become cosines).
        epochs: Most epochs; early stopping keeps the best on validation.
        max_param_share: For a student, the most trainable parameters it may have as a share
            of its teacher's on the same catalogue: the embedding dimension shrinks (from
            ``embedding_dim``) until the student fits. None: no budget (the teacher).
    """

    embedding_dim: int = 128
    side_dim: int = 16
    hidden_units: tuple[int, ...] = (256, 128)
    output_dim: int = 128
    dropout: float = 0.1
    l2: float = 1e-8
    normalize: bool = True
    epochs: int = 30
    max_param_share: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_units", tuple(int(h) for h in self.hidden_units))
        for dim in ("embedding_dim", "side_dim", "output_dim"):
            _check(getattr(self, dim) >= 1, f"tower {dim} must be >= 1, got {getattr(self, dim)!r}")
        _check(all(h >= 1 for h in self.hidden_units), f"tower hidden_units must be >= 1, got {list(self.hidden_units)}")
        _check(0.0 <= self.dropout < 1.0, f"tower dropout must be in [0, 1), got {self.dropout!r}")
        _check(self.l2 >= 0.0, f"tower l2 must be >= 0, got {self.l2!r}")
        _check(self.epochs >= 1, f"tower epochs must be >= 1, got {self.epochs!r}")
        _check(self.max_param_share is None or 0.0 < self.max_param_share <= 1.0,
               f"tower max_param_share must be in (0, 1], got {self.max_param_share!r}")


def _default_student() -> TowerConfig:
    """At most 10% of the teacher's parameters on any catalogue (73,560 vs 770,784 on ML-100K)."""
    return TowerConfig(embedding_dim=16, side_dim=4, hidden_units=(32,), output_dim=32, dropout=0.0, l2=0.0, epochs=20,
                       max_param_share=0.10)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation of the teacher's soft targets into the student.

    Loss: ``alpha * hard + (1 - alpha) * soft + beta * hint``.

    Attributes:
        distill_temperature: T of the softened distributions in the soft loss (the soft
            term is scaled by T^2).
        alpha: Weight of the hard (true-interaction) loss; 1 - alpha weighs the soft loss.
            The defaults (alpha 0.5, beta 0.1, T 1) had the best validation NDCG@10 of an
            18-point grid on ML-100K (``bench/results/distill_search.md``).
        beta: Weight of the hint (intermediate-layer MSE) loss.
        soft_loss: ``"kl"`` (softened teacher scores) or ``"ranking"`` (teacher top-K as
            position-weighted positives, as in Ranking Distillation).
        ranking_decay: Position-weight decay of the ranking loss, ``w_k ~ exp(-k / decay)``.
        sampled_negatives: Uniformly sampled items added to each user's teacher candidates.
        full_catalogue_max_items: With the ``"kl"`` loss, the soft targets are the teacher's
            distribution over the whole catalogue when it has at most this many items;
            above, over each user's teacher top-K plus ``sampled_negatives``.
        ladder: The student ladder: parameter budgets (shares of the teacher's parameters),
            one distilled student each from the same soft targets; the gate promotes the
            cheapest to serve that passes. Empty: one student at ``student.max_param_share``.
    """

    distill_temperature: float = 1.0
    alpha: float = 0.5
    beta: float = 0.1
    soft_loss: str = "kl"
    ranking_decay: float = 10.0
    sampled_negatives: int = 100
    full_catalogue_max_items: int = 5_000
    ladder: tuple[float, ...] = (0.05, 0.10)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ladder", tuple(float(share) for share in self.ladder))
        _check(all(0.0 < share <= 1.0 for share in self.ladder) and list(self.ladder) == sorted(set(self.ladder)),
               f"distill.ladder must be increasing shares in (0, 1], got {list(self.ladder)}")
        _check(self.full_catalogue_max_items >= 0, f"distill.full_catalogue_max_items must be >= 0, got {self.full_catalogue_max_items!r}")
        _check(self.distill_temperature > 0, f"distill.distill_temperature must be > 0, got {self.distill_temperature!r}")
        _check(0.0 <= self.alpha <= 1.0, f"distill.alpha must be in [0, 1], got {self.alpha!r}")
        _check(self.beta >= 0.0, f"distill.beta must be >= 0, got {self.beta!r}")
        _check(self.soft_loss in ("kl", "ranking"), f"distill.soft_loss must be 'kl' or 'ranking', got {self.soft_loss!r}")
        _check(self.ranking_decay > 0, f"distill.ranking_decay must be > 0, got {self.ranking_decay!r}")
        _check(self.sampled_negatives >= 0, f"distill.sampled_negatives must be >= 0, got {self.sampled_negatives!r}")


@dataclasses.dataclass(frozen=True)
class SoftTargetConfig:
    """Batch soft targets written by the teacher.

    Both engines write the same rows: users are scored in the same batches of
    ``batch_size`` consecutive users (in ``user_idx`` order), on which a score's last bits
    depend.

    Attributes:
        top_k: Teacher candidates per user.
        batch_size: Users scored per batch (scores take ``batch_size x items`` floats).
        pairs_per_chunk: The numpy engine reads the users' known (user, item) pairs in
            ``user_idx`` ranges of about this many pairs (8 bytes each), which one pass over
            the interactions spills to temporary files.
        spark_min_users: Score on Spark when at least this many users get targets; below,
            in this process with numpy.
        spark_master: When set, always score on Spark, on this master (e.g.
            ``spark://host:7077``; ``local[2]``); None: Spark only from ``spark_min_users``
            users, on spark-submit's master or else ``local[*]``.
    """

    top_k: int = 100
    batch_size: int = 512
    pairs_per_chunk: int = 4_000_000
    spark_min_users: int = 2_000_000
    spark_master: str | None = dataclasses.field(default=None, metadata={"expects": "a master URL"})

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, f"soft_targets.top_k must be >= 1, got {self.top_k!r}")
        _check(self.batch_size >= 1, f"soft_targets.batch_size must be >= 1, got {self.batch_size!r}")
        _check(self.pairs_per_chunk >= 1, f"soft_targets.pairs_per_chunk must be >= 1, got {self.pairs_per_chunk!r}")
        _check(self.spark_min_users >= 1, f"soft_targets.spark_min_users must be >= 1, got {self.spark_min_users!r}")
        _check(self.spark_master is None or (isinstance(self.spark_master, str) and self.spark_master.strip() != ""),
               f"soft_targets.spark_master must be a master URL or null, got {self.spark_master!r}")

    def engine(self, users: int) -> str:
        """``"spark"`` or ``"numpy"``: the engine that scores ``users`` users."""
        return "spark" if self.spark_master is not None or users >= self.spark_min_users else "numpy"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Every stage's settings, one section per concern.

    An artifact's identity hashes only the sections it depends on, with its inputs'
    identities (see :mod:`pipeline.catalog`): the teacher ``training``, ``teacher`` and
    ``serving``; the soft targets their teacher and ``soft_targets``; a student its soft
    targets, ``training``, ``student``, ``distill`` and ``serving``.
    """

    features: FeatureConfig = dataclasses.field(default_factory=FeatureConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    teacher: TowerConfig = dataclasses.field(default_factory=TowerConfig)
    student: TowerConfig = dataclasses.field(default_factory=_default_student)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    soft_targets: SoftTargetConfig = dataclasses.field(default_factory=SoftTargetConfig)
    serving: ServingConfig = dataclasses.field(default_factory=ServingConfig)
    evaluate: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    gate: GateConfig = dataclasses.field(default_factory=GateConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (mappings turned back into plain dicts)."""
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Short, stable hash of every setting, for run keys."""
        return stable_hash(self.to_dict())

    def section_hash(self, *sections: str, inputs: Mapping[str, Any] | None = None) -> str:
        """Short, stable hash of the named sections and of upstream identities ``inputs``."""
        return stable_hash({"sections": {name: dataclasses.asdict(getattr(self, name)) for name in sections},
                            "inputs": dict(inputs or {})})

    def ladder_rungs(self) -> tuple[float | None, ...]:
        """The parameter budgets of the students to distil (``distill.ladder``, else the one student's)."""
        return self.distill.ladder or (self.student.max_param_share,)

    def rung(self, share: float | None) -> "PipelineConfig":
        """The settings of one rung: the student at budget ``share``, alone. A rung's identity
        depends on its own budget, not on the rest of the ladder."""
        return dataclasses.replace(self, student=dataclasses.replace(self.student, max_param_share=share),
                                   distill=dataclasses.replace(self.distill, ladder=()))

    def rung_name(self, share: float | None) -> str:
        """The model name of a rung in evaluations and reports: ``student_kd`` for a one-rung ladder."""
        return "student_kd" if len(self.ladder_rungs()) == 1 else f"student_kd@{share:.0%}"

    def plain_student(self) -> "PipelineConfig":
        """The no-distillation baseline: the same student, epochs and seed, hard loss only."""
        return dataclasses.replace(self, distill=dataclasses.replace(self.distill, alpha=1.0, beta=0.0))


def stable_hash(payload: Any) -> str:
    """16 hex digits of the SHA-256 of ``payload`` as sorted JSON."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
