"""Two-tower retrieval models (TensorFlow Recommenders), built from a :class:`TowerConfig`.

Both towers take only an index: the query tower a ``user_idx`` and the candidate tower an
``item_idx``. Side inputs (history, age, gender, occupation; year, categories) live in
non-trainable tables inside the towers, so the exported model needs nothing but an id.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from pipeline.config import ConfigError, PipelineConfig, ServingConfig, TowerConfig, TrainingConfig, load_config
from pipeline.data.features import ItemTable, UserTable, load_item_table, load_user_table, with_history_before_test
from pipeline.modeling.retrieval import build_index, save_index
from pipeline.records import ModelMetadata
from pipeline.serving import SERVING_INDEX_DIR, build_serving_index, save_serving_index


def _embedding(rows: int, dim: int, l2: float, name: str) -> tf.keras.layers.Embedding:
    regularizer = tf.keras.regularizers.l2(l2) if l2 else None
    return tf.keras.layers.Embedding(rows, dim, embeddings_regularizer=regularizer, name=name)


class _MLP(tf.keras.layers.Layer):
    """Hidden layers (ReLU, dropout) then a linear output; returns ``(output, last hidden)``."""

    def __init__(self, cfg: TowerConfig, **kwargs):
        super().__init__(**kwargs)
        self.normalize = cfg.normalize
        regularizer = tf.keras.regularizers.l2(cfg.l2) if cfg.l2 else None
        self.hidden = [tf.keras.layers.Dense(units, activation="relu", kernel_regularizer=regularizer) for units in cfg.hidden_units]
        self.dropout = tf.keras.layers.Dropout(cfg.dropout)
        self.output_layer = tf.keras.layers.Dense(cfg.output_dim, kernel_regularizer=regularizer)

    def call(self, x, training=False):
        for layer in self.hidden:
            x = self.dropout(layer(x), training=training)
        out = self.output_layer(x)
        return (tf.math.l2_normalize(out, axis=-1) if self.normalize else out), x


class QueryTower(tf.keras.Model):
    """``user_idx [batch]`` -> user embedding ``[batch, output_dim]``."""

    def __init__(self, users: UserTable, num_items: int, cfg: TowerConfig, **kwargs):
        super().__init__(**kwargs)
        self.history = tf.constant(users.history, dtype=tf.int32)  # [num_users, history_length]
        self.side = tf.constant(np.stack([users.age_bucket, users.gender, users.occupation], axis=1), dtype=tf.int32)
        sizes = [int(self.side[:, i].numpy().max()) + 1 for i in range(3)]
        self.user_embedding = _embedding(users.size, cfg.embedding_dim, cfg.l2, "user_embedding")
        self.history_embedding = _embedding(num_items, cfg.embedding_dim, cfg.l2, "history_embedding")
        self.side_embeddings = [_embedding(n, cfg.side_dim, 0.0, f"side_{i}") for i, n in enumerate(sizes)]
        self.mlp = _MLP(cfg, name="query_mlp")

    def embed(self, user_idx: tf.Tensor, training: bool = False, history: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """Returns ``(embedding [batch, output_dim], last hidden layer [batch, hidden])``.

        ``history [batch, history_length]`` replaces each user's stored (latest) history:
        training gives a pair the items before it.
        """
        if history is None:
            history = tf.gather(self.history, user_idx)
        mask = tf.cast(history > 0, tf.float32)[..., None]
        pooled = tf.reduce_sum(self.history_embedding(history) * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
        side = tf.gather(self.side, user_idx)
        parts = [self.user_embedding(user_idx), pooled] + [emb(side[:, i]) for i, emb in enumerate(self.side_embeddings)]
        return self.mlp(tf.concat(parts, axis=-1), training=training)

    def call(self, user_idx, training=False):
        return self.embed(user_idx, training)[0]


class CandidateTower(tf.keras.Model):
    """``item_idx [batch]`` -> item embedding ``[batch, output_dim]``."""

    def __init__(self, items: ItemTable, cfg: TowerConfig, **kwargs):
        super().__init__(**kwargs)
        self.year = tf.constant(items.year_bucket, dtype=tf.int32)
        self.categories = tf.constant(items.categories, dtype=tf.int32)  # [num_items, max_categories]
        self.item_embedding = _embedding(items.size, cfg.embedding_dim, cfg.l2, "item_embedding")
        self.year_embedding = _embedding(int(items.year_bucket.max()) + 1, cfg.side_dim, 0.0, "year_embedding")
        self.category_embedding = _embedding(int(items.categories.max()) + 1, cfg.side_dim, 0.0, "category_embedding")
        self.mlp = _MLP(cfg, name="candidate_mlp")

    def embed(self, item_idx: tf.Tensor, training: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """Returns ``(embedding [batch, output_dim], last hidden layer [batch, hidden])``."""
        categories = tf.gather(self.categories, item_idx)
        mask = tf.cast(categories > 0, tf.float32)[..., None]
        pooled = tf.reduce_sum(self.category_embedding(categories) * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
        parts = [self.item_embedding(item_idx), self.year_embedding(tf.gather(self.year, item_idx)), pooled]
        return self.mlp(tf.concat(parts, axis=-1), training=training)

    def call(self, item_idx, training=False):
        return self.embed(item_idx, training)[0]


class TwoTowerModel(tfrs.Model):
    """Two-tower retrieval model; its hard loss is a softmax over candidate items.

    With ``num_items`` given (a catalogue small enough), the softmax runs over every real
    item: no sampling bias. Otherwise it is the in-batch softmax of ``tfrs.tasks.Retrieval``,
    where popular items are over-represented as negatives; passing their sampling
    probability lets the task apply the logQ correction. Either way the hard loss is the
    *mean* over the batch of each row's cross-entropy (TFRS sums by default), so it is on
    the scale of the distillation's soft and hint terms.
    """

    def __init__(self, query: QueryTower, candidate: CandidateTower, item_probability: np.ndarray | None,
                 retrieval_temperature: float = 1.0, num_items: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.query = query
        self.candidate = candidate
        self.retrieval_temperature = retrieval_temperature
        self.catalogue = None if num_items is None else tf.range(1, num_items, dtype=tf.int32)  # real items, no padding
        self.item_probability = None if item_probability is None else tf.constant(item_probability, dtype=tf.float32)
        mean_cross_entropy = tf.keras.losses.CategoricalCrossentropy(
            from_logits=True, reduction=tf.keras.losses.Reduction.SUM_OVER_BATCH_SIZE)
        self.task = tfrs.tasks.Retrieval(loss=mean_cross_entropy, remove_accidental_hits=True,
                                         temperature=retrieval_temperature)

    def hard_loss(self, features: dict, training: bool = False) -> tf.Tensor:
        """Softmax loss on the true ``(user_idx, item_idx)`` pairs of a batch (full-catalogue or in-batch)."""
        users, _ = self.query.embed(features["user_idx"], training=training, history=features.get("history"))
        if self.catalogue is not None:
            items = self.candidate(self.catalogue, training=training)  # [num_items - 1, d]
            logits = tf.matmul(users, items, transpose_b=True) / self.retrieval_temperature  # [B, num_items - 1]
            return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=features["item_idx"] - 1, logits=logits))
        items = self.candidate(features["item_idx"], training=training)
        probability = None if self.item_probability is None else tf.gather(self.item_probability, features["item_idx"])
        return self.task(users, items, compute_metrics=False, candidate_sampling_probability=probability,
                         candidate_ids=features["item_idx"])

    def compute_loss(self, features, training=False):
        return self.hard_loss(features, training)


def _item_probability(items: ItemTable) -> np.ndarray:
    counts = np.maximum(items.popularity, 1.0)
    counts[0] = 1.0
    return counts / counts.sum()


def build_model(users: UserTable, items: ItemTable, tower: TowerConfig, training: TrainingConfig, name: str) -> TwoTowerModel:
    """A two-tower model with the given architecture and hard-loss settings."""
    full_softmax = items.size - 1 <= training.full_softmax_max_items
    return TwoTowerModel(
        QueryTower(users, items.size, tower, name=f"{name}_query"),
        CandidateTower(items, tower, name=f"{name}_candidate"),
        _item_probability(items) if training.logq_correction else None,
        retrieval_temperature=training.retrieval_temperature,
        num_items=items.size if full_softmax else None,
        name=name,
    )


def _mlp_params(inputs: int, cfg: TowerConfig) -> int:
    widths = [inputs, *cfg.hidden_units, cfg.output_dim]
    return sum((a + 1) * b for a, b in zip(widths, widths[1:]))  # kernels and biases


def count_tower_params(users: UserTable, items: ItemTable, cfg: TowerConfig) -> int:
    """Trainable parameters of a two-tower model of ``cfg`` on this catalogue, worked out from the shapes.

    Query tower: user-id and history-item embeddings (``embedding_dim``), three side
    embeddings (``side_dim``) and an MLP over ``2 * embedding_dim + 3 * side_dim`` inputs.
    Candidate tower: item-id embedding, year and category embeddings and an MLP over
    ``embedding_dim + 2 * side_dim`` inputs. Equals the built model's trainable variables.
    """
    e, s = cfg.embedding_dim, cfg.side_dim
    side_rows = sum(int(col.max()) + 1 for col in (users.age_bucket, users.gender, users.occupation))
    query = (users.size + items.size) * e + side_rows * s + _mlp_params(2 * e + 3 * s, cfg)
    candidate_rows = (int(items.year_bucket.max()) + 1) + (int(items.categories.max()) + 1)
    candidate = items.size * e + candidate_rows * s + _mlp_params(e + 2 * s, cfg)
    return query + candidate


def size_student(users: UserTable, items: ItemTable, cfg: PipelineConfig) -> TowerConfig:
    """The student architecture that fits ``cfg.student.max_param_share`` of the teacher on this catalogue.

    The embedding dimension (which dominates: it multiplies the number of users and items)
    is the largest one, up to ``cfg.student.embedding_dim``, within the budget. The output
    width (what serving costs: the index holds ``items x output_dim`` floats and every query
    scores that many) shrinks in proportion, to no less than 8 (or ``output_dim`` if smaller):
    a smaller rung of the ladder is also cheaper to serve.

    Raises:
        ConfigError: When not even a 1-dimensional embedding fits the budget.
    """
    student = cfg.student
    if student.max_param_share is None:
        return student
    budget = student.max_param_share * count_tower_params(users, items, cfg.teacher)
    for dim in range(student.embedding_dim, 0, -1):
        output_dim = max(min(8, student.output_dim), round(student.output_dim * dim / student.embedding_dim))
        sized = dataclasses.replace(student, embedding_dim=dim, output_dim=output_dim)
        if count_tower_params(users, items, sized) <= budget:
            return sized
    smallest = dataclasses.replace(student, embedding_dim=1, output_dim=min(8, student.output_dim))
    raise ConfigError(
        f"student.max_param_share={student.max_param_share} allows {budget:,.0f} parameters, but the smallest student "
        f"(embedding_dim=1) has {count_tower_params(users, items, smallest):,} "
        f"on {users.size - 1:,} users and {items.size - 1:,} items: raise the share or shrink student side_dim/hidden_units"
    )


def build_teacher(users: UserTable, items: ItemTable, cfg: PipelineConfig) -> TwoTowerModel:
    """The large teacher (``cfg.teacher``): wide id embeddings, pooled history, side features, deep towers."""
    return build_model(users, items, cfg.teacher, cfg.training, "teacher")


def build_student(users: UserTable, items: ItemTable, cfg: PipelineConfig) -> TwoTowerModel:
    """The small student (``cfg.student`` sized by its budget): same inputs, small embeddings, shallow towers."""
    return build_model(users, items, size_student(users, items, cfg), cfg.training, "student")


def embed_all(tower: tf.keras.Model, size: int, batch_size: int = 4096) -> np.ndarray:
    """Embeddings of indices ``0..size-1`` ``[size, output_dim]`` (row 0 is padding)."""
    out = [tower(tf.range(start, min(start + batch_size, size), dtype=tf.int32), training=False).numpy()
           for start in range(0, size, batch_size)]
    return np.concatenate(out, axis=0)


def absent_token(vocabulary: list[str], base: str = "[UNK]") -> str:
    """An OOV token for a ``StringLookup`` of ``vocabulary`` that is none of its ids.

    ``StringLookup`` drops a vocabulary's first entry when it equals the OOV token (taking
    it for the token it reserves), which would shift every later id down one row; an id
    equal to the token anywhere else would be fine, but no id can be trusted not to be
    ``"[UNK]"``. So the token is ``base`` followed by as few ``#`` as make it absent:
    the same vocabulary always gives the same token.
    """
    taken = set(vocabulary)
    token = base
    while token in taken:
        token += "#"
    return token


def export_retrieval(model: TwoTowerModel, users: UserTable, items: ItemTable, path: str | Path,
                     serving: ServingConfig, probe_user_ids: np.ndarray | list[str] | None = None) -> Path:
    """Save a SavedModel that serves the top-``serving.top_k`` items for a batch of user ids,
    and the faiss serving index of the same item vectors beside it.

    The exported model is the query tower behind a ``StringLookup`` of user ids and the
    top-K index ``serving.index`` names (:func:`pipeline.modeling.retrieval.build_index`) over every
    real item; called with a 1-D string tensor of user ids it returns
    ``(scores [batch, k], item_ids [batch, k])``, ``k = min(top_k, items)``. It also holds
    ``query_model``, ``item_vectors [items, d]`` and ``item_ids [items]`` for exact offline
    evaluation. Only the towers are exported: any training-only layer of a distillation
    model stays behind. The exported query tower serves ``users.history`` (callers pass
    :func:`pipeline.data.features.with_history_before_test`), whatever history it trained with.

    The serving index (:func:`pipeline.serving.build_serving_index`; what
    :class:`pipeline.serving.ServingModel` serves) goes to ``serving_index/`` in ``path``'s
    parent, the model's directory; its record is :func:`pipeline.serving.read_index_record`
    of that directory.

    Args:
        model: The trained two-tower model.
        users: The users served, with the history the query tower serves.
        items: Every item (row 0 is padding).
        path: Where the SavedModel goes (``<model dir>/saved_model``).
        serving: The SavedModel's index and the serving index's settings.
        probe_user_ids: The users whose queries tune and measure the serving index (the
            validation users); sampled down to ``serving.ann_probe_users`` with
            ``serving.seed``. None: such a sample of every user.

    Returns:
        ``path``.
    """
    vocabulary = [str(user_id) for user_id in users.user_ids[1:]]
    # Lookup index i is model row i: real ids 1.., unknown ids 0 (padding).
    lookup = tf.keras.layers.StringLookup(vocabulary=vocabulary, num_oov_indices=1, oov_token=absent_token(vocabulary))
    trained_history = model.query.history
    model.query.history = tf.constant(users.history, dtype=tf.int32)  # traced into the SavedModel below
    try:
        query = tf.keras.Sequential([lookup, model.query])
        item_vectors = embed_all(model.candidate, items.size)[1:]
        item_ids = np.asarray(items.item_ids[1:])
        probes = _probe_users(vocabulary if probe_user_ids is None else probe_user_ids, serving)
        probe_queries = np.concatenate([query(tf.constant(probes[start:start + 4096])).numpy()
                                        for start in range(0, len(probes), 4096)])
        saved = save_index(build_index(query, item_vectors, item_ids, serving), users.user_ids[1:2], path)
        index, record = build_serving_index(item_vectors, item_ids, probe_queries, serving)
        # Every known user's query vector, so serving a known user is a lookup and a search.
        user_vectors = np.concatenate([query(tf.constant(vocabulary[start:start + 4096])).numpy()
                                       for start in range(0, len(vocabulary), 4096)])
        save_serving_index(Path(path).parent / SERVING_INDEX_DIR, index, item_ids, record, np.asarray(vocabulary), user_vectors)
        return saved
    finally:
        model.query.history = trained_history


def _probe_users(user_ids: np.ndarray | list[str], serving: ServingConfig) -> np.ndarray:
    """At most ``serving.ann_probe_users`` of ``user_ids`` (distinct, as strings), sampled with ``serving.seed``.

    Raises:
        ValueError: If there is no user id.
    """
    ids = np.unique(np.asarray(user_ids).astype(str))
    if ids.size == 0:
        raise ValueError("the serving index needs at least one probe user id")
    if ids.size > serving.ann_probe_users:
        ids = np.sort(np.random.default_rng(serving.seed).choice(ids, serving.ann_probe_users, replace=False))
    return ids


def restore_teacher(teacher_dir: str | Path, features_dir: str | Path) -> tuple[TwoTowerModel, UserTable, ItemTable, ModelMetadata]:
    """Rebuild the teacher of ``teacher_dir`` from its recorded settings and load its weights.

    Args:
        teacher_dir: The exported teacher.
        features_dir: The features it was trained on, as the catalogue finds them (the
            teacher's identity includes theirs); the path its metadata recorded is not followed.

    Returns:
        ``(model, users, items, metadata)``; ``users`` holds the history the teacher last
        trained with (train + validation for a refitted teacher, else train).

    Raises:
        ArtifactNotFound: When ``teacher_dir`` holds no exported teacher.
    """
    meta = ModelMetadata.load(teacher_dir)
    teacher_dir = Path(teacher_dir)
    users, items = load_user_table(features_dir), load_item_table(features_dir)
    cfg = load_config(meta.config)
    if cfg.training.refit:  # it last trained knowing train + validation: query with that history
        users = with_history_before_test(features_dir, users, items.size)
    model = build_teacher(users, items, cfg)
    model.load_weights(str(teacher_dir / "checkpoint" / "weights")).expect_partial()
    return model, users, items, meta
