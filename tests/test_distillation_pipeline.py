"""Teacher -> soft targets -> student on a tiny synthetic log: schema, determinism, the
frozen teacher, the training-only hint projection, and the whole chain end to end."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.data.synthetic import generate_synthetic_logs
from spark_jobs import extract_features as job

DS = "2024-01-31"
TINY = load_config({
    "features": {"window_days": 14, "shuffle_partitions": 2},
    "training": {"batch_size": 256, "patience": 1},
    "teacher": {"embedding_dim": 32, "hidden_units": [32], "output_dim": 32, "epochs": 2},
    "student": {"embedding_dim": 8, "hidden_units": [8], "output_dim": 8, "epochs": 2},
    "distill": {"sampled_negatives": 10, "ladder": []}, "soft_targets": {"top_k": 20}, "serving": {"top_k": 20},
    "evaluate": {"latency_repeats": 3, "latency_batch_size": 16},
})


def read_soft_targets(path, num_users: int, num_items: int) -> dict[str, np.ndarray]:
    """The soft targets as dense tables indexed by ``user_idx`` / ``item_idx``: the reference
    the streamed rows are checked against (distillation never loads them like this).

    Returns:
        ``topk_item_idx [num_users, K]``, ``topk_scores [num_users, K]``,
        ``user_embedding [num_users, D]``, ``item_embedding [num_items, D]`` and
        ``has_targets [num_users]`` (False for users without train interactions).
    """
    path = Path(path)
    manifest = json.loads((path / "manifest.json").read_text())
    k, dim = manifest["k"], manifest["dim"]
    table = pq.read_table(path / "users.parquet")
    rows = table.column("user_idx").to_numpy()

    def matrix(name: str, width: int) -> np.ndarray:
        return table.column(name).combine_chunks().flatten().to_numpy().reshape(-1, width)

    out = {
        "topk_item_idx": np.zeros((num_users, k), np.int32), "topk_scores": np.zeros((num_users, k), np.float32),
        "user_embedding": np.zeros((num_users, dim), np.float32), "has_targets": np.zeros(num_users, bool),
    }
    out["topk_item_idx"][rows] = matrix("topk_item_idx", k)
    out["topk_scores"][rows] = matrix("topk_scores", k)
    out["user_embedding"][rows] = matrix("teacher_user_embedding", dim)
    out["has_targets"][rows] = True
    out["logit_scale"] = float(manifest["logit_scale"])
    items = pq.read_table(path / "items.parquet")
    out["item_embedding"] = np.zeros((num_items, dim), np.float32)
    out["item_embedding"][items.column("item_idx").to_numpy()] = items.column("teacher_item_embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return out


@pytest.fixture(scope="module")
def chain(spark, tmp_path_factory):
    """Features, teacher, soft targets and student for one tiny synthetic log."""
    from pipeline.steps.chain import run_chain

    catalog = Catalog(tmp_path_factory.mktemp("chain") / "data")
    generate_synthetic_logs(catalog.raw, users=120, items=80, days=14, events=8_000, seed=5, end_date=DS)
    job.run(spark, catalog.raw, catalog.features_root, dt.date.fromisoformat(DS), TINY.features, validate_data=False)
    return {"catalog": catalog, **run_chain(DS, catalog, TINY)}


def test_chain_runs_end_to_end(chain):
    teacher, student = chain["teacher"], chain["student"]
    assert student["teacher_version"] == teacher["version"]
    assert 0 < student["trainable_params"] < teacher["trainable_params"]
    for name in ("recall@20", "ndcg@10"):
        assert 0.0 <= student["metrics"]["validation"][name] <= 1.0
    print(f"\ntiny teacher -> soft targets -> student: {chain['seconds']:.1f}s")


def test_soft_target_schema_and_determinism(chain):
    from pipeline.steps.soft_targets import generate_soft_targets

    path = chain["soft_targets"]["path"]
    users = pq.read_table(f"{path}/users.parquet")
    k, dim = chain["soft_targets"]["k"], chain["soft_targets"]["dim"]
    assert users.schema.names == ["user_idx", "user_id", "topk_item_idx", "topk_scores", "teacher_user_embedding"]
    assert users.schema.field("topk_item_idx").type == pa.list_(pa.int32(), k)
    assert users.schema.field("teacher_user_embedding").type == pa.list_(pa.float32(), dim)
    assert users.column("user_idx").to_pylist() == sorted(users.column("user_idx").to_pylist())
    scores = users.column("topk_scores").combine_chunks().flatten().to_numpy().reshape(-1, k)
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first
    # The items the refitted teacher trained on (train and validation) are never among its candidates.
    known = set()
    for split in ("train", "validation"):
        inter = pq.read_table(chain["catalog"].features(DS) / "interactions" / f"split={split}")
        known |= set(zip(inter.column("user_idx").to_pylist(), inter.column("item_idx").to_pylist()))
    top = users.column("topk_item_idx").combine_chunks().flatten().to_numpy().reshape(-1, k)
    assert not any((u, i) in known for u, row in zip(users.column("user_idx").to_pylist(), top) for i in row)
    # Re-running with the same teacher rewrites identical rows.
    again = generate_soft_targets(DS, chain["catalog"], TINY)
    assert again["path"] == path and pq.read_table(f"{path}/users.parquet").equals(users)
    assert again["engine"] == chain["soft_targets"]["engine"] == "numpy"  # far fewer users than spark_min_users
    dense = read_soft_targets(path, 200, 100)
    assert dense["has_targets"].sum() == users.num_rows and dense["item_embedding"].shape[1] == dim


def test_numpy_and_spark_engines_write_the_same_targets(chain, spark):
    from pipeline.steps.soft_targets import generate_soft_targets

    def run(**settings):
        cfg = dataclasses.replace(TINY, soft_targets=dataclasses.replace(TINY.soft_targets, batch_size=16, **settings))
        result = generate_soft_targets(DS, chain["catalog"], cfg, spark=spark)
        path = Path(result["path"])
        return result, path / "users.parquet", json.loads((path / "manifest.json").read_text())

    # About 120 users in batches of 16; the numpy engine reads the known pairs in ranges of about 500.
    local, local_file, local_manifest = run(pairs_per_chunk=500)
    remote, remote_file, remote_manifest = run(spark_min_users=1)
    assert (local["engine"], remote["engine"]) == ("numpy", "spark")
    local_users = pq.read_table(local_file)
    assert pq.read_table(remote_file).equals(local_users)
    assert local_users.num_rows == local["users"] == remote["users"] > 16 * 6
    assert {key for key in local_manifest.keys() | remote_manifest.keys()
            if local_manifest.get(key) != remote_manifest.get(key)} == {"engine"}
    assert (local_manifest["engine"], remote_manifest["engine"]) == ("numpy", "spark")
    # The very same file: one row group per batch of 16 users in both.
    assert pq.ParquetFile(local_file).metadata.num_row_groups == -(-local_users.num_rows // 16)
    assert local_file.read_bytes() == remote_file.read_bytes()


def _model_and_batch(chain, scratch, distill):
    """A distillation model on the chain's soft targets, and a batch of four pairs of users with
    targets (unsorted, one repeated) carrying their rows as the training stream does."""
    from pipeline.data.features import load_item_table, load_user_table
    from pipeline.modeling.models import build_student
    from pipeline.soft_targets.rows import UserSoftTargets, read_teacher_items
    from pipeline.steps.distill import DistillationModel

    features, path = chain["catalog"].features(DS), chain["soft_targets"]["path"]
    users, items = load_user_table(features), load_item_table(features)
    model = DistillationModel(build_student(users, items, TINY), read_teacher_items(path, items.size), distill,
                              TINY.training.retrieval_temperature)
    with_targets = pq.read_table(f"{path}/users.parquet", columns=["user_idx"]).column("user_idx").to_numpy()
    user_idx = with_targets[[3, 0, 3, 7]]
    batch = {"user_idx": tf.constant(user_idx, tf.int32), "item_idx": tf.constant([4, 5, 6, 7], tf.int32),
             **{name: tf.constant(rows) for name, rows in UserSoftTargets(path, scratch)(user_idx).items()}}
    return model, batch, users, items


@pytest.mark.parametrize("full_catalogue_max_items", [20_000, 0], ids=["whole-catalogue soft loss", "top-K + sampled soft loss"])
def test_teacher_gets_no_gradient_and_hint_projection_is_not_exported(chain, tmp_path, full_catalogue_max_items):
    distill = dataclasses.replace(TINY.distill, full_catalogue_max_items=full_catalogue_max_items)
    model, batch, users, _ = _model_and_batch(chain, tmp_path, distill)
    assert (model.catalogue is not None) == (full_catalogue_max_items > 0)
    with tf.GradientTape(persistent=True) as tape:
        terms = model.loss_terms(batch)
    assert set(terms) == {"loss", "hard_loss", "soft_loss", "hint_loss"}
    assert tape.gradient(terms["loss"], model.teacher_item) is None
    assert not any(v.name.startswith("teacher_") for v in model.trainable_variables)
    # No table of every user's targets: besides the student's own, no variable has a row per user.
    student = {id(v) for v in model.student.variables}
    assert not any(v.shape[0] == users.size for v in model.variables if id(v) not in student)
    projection = [v for v in model.trainable_variables if "hint_projection" in v.name]
    assert projection and all(tape.gradient(terms["loss"], v) is not None for v in projection)
    before = model.teacher_item.numpy().copy()
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01))
    model.fit(tf.data.Dataset.from_tensors(batch).repeat(3), verbose=0)
    assert np.array_equal(before, model.teacher_item.numpy())

    exported = tf.saved_model.load(f"{chain['student']['path']}/saved_model")
    names = [v.name for v in exported.variables]
    assert names and not any("hint_projection" in n or n.startswith("teacher_") for n in names)
    scores, ids = exported(tf.constant(users.user_ids[1:4].astype(str)))
    assert scores.shape == (3, TINY.serving.top_k) and ids.dtype == tf.string


@pytest.mark.parametrize("full_catalogue_max_items", [20_000, 0], ids=["whole-catalogue soft loss", "top-K + sampled soft loss"])
def test_loss_terms_from_streamed_rows_equal_the_dense_table_formula(chain, tmp_path, full_catalogue_max_items):
    distill = dataclasses.replace(TINY.distill, alpha=0.3, beta=0.2, full_catalogue_max_items=full_catalogue_max_items)
    model, batch, users, items = _model_and_batch(chain, tmp_path, distill)
    model.loss_terms(batch, training=False)  # builds every layer, so no initializer draws from the seed below
    tf.random.set_seed(11)
    terms = {name: float(value) for name, value in model.loss_terms(batch, training=False).items()}

    # The formula as it was: every teacher row gathered by user_idx from dense [num_users, ...] tables.
    dense = read_soft_targets(chain["soft_targets"]["path"], users.size, items.size)
    user_idx, item_idx = batch["user_idx"].numpy(), batch["item_idx"].numpy()
    student = model.student
    user_vec, user_hidden = student.query.embed(batch["user_idx"])
    teacher_user = dense["user_embedding"][user_idx]  # [B, D]
    if full_catalogue_max_items:
        candidates = np.tile(np.arange(1, items.size), (len(user_idx), 1))
    else:
        tf.random.set_seed(11)  # the same negatives as inside loss_terms
        negatives = tf.random.uniform([len(user_idx), distill.sampled_negatives], 1, items.size, dtype=tf.int32).numpy()
        candidates = np.concatenate([dense["topk_item_idx"][user_idx], negatives], axis=1)
    student_items = student.candidate(tf.constant(candidates.reshape(-1))).numpy().reshape(*candidates.shape, -1)
    student_logits = np.einsum("bd,bcd->bc", user_vec.numpy(), student_items) / TINY.training.retrieval_temperature
    teacher_logits = dense["logit_scale"] * np.einsum("bd,bcd->bc", teacher_user, dense["item_embedding"][candidates])
    soft = float(model.soft_loss(tf.constant(teacher_logits), tf.constant(student_logits)))
    _, item_hidden = student.candidate.embed(batch["item_idx"])
    hint = float(np.mean((model.user_projection(user_hidden).numpy() - teacher_user) ** 2)
                 + np.mean((model.item_projection(item_hidden).numpy() - dense["item_embedding"][item_idx]) ** 2))
    hard = float(student.hard_loss(batch))
    expected = {"hard_loss": hard, "soft_loss": soft, "hint_loss": hint, "loss": 0.3 * hard + 0.7 * soft + 0.2 * hint}
    assert soft > 0 and hint > 0
    assert terms == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_default_student_is_at_most_a_tenth_of_the_default_teacher(chain):
    from pipeline.data.features import load_item_table, load_user_table
    from pipeline.modeling.models import build_student, build_teacher

    features = chain["catalog"].features(DS)
    users, items = load_user_table(features), load_item_table(features)
    defaults = load_config()
    sizes = {}
    for name, build in (("teacher", build_teacher), ("student", build_student)):
        model = build(users, items, defaults)
        model.query(tf.constant([1])), model.candidate(tf.constant([1]))
        sizes[name] = sum(v.shape.num_elements() for v in model.trainable_variables)
    assert sizes["student"] <= 0.10 * sizes["teacher"], sizes


def test_teacher_metadata_and_reuse(chain):
    from pipeline.steps.train_teacher import train_teacher

    catalog = chain["catalog"]
    meta = json.loads((catalog.teacher(DS, TINY) / "metadata.json").read_text())
    assert meta["ds"] == DS and meta["best_epoch"] >= 1 and len(meta["history"]) >= 1
    assert {"loss", "val_score", "seconds"} <= set(meta["history"][0])
    reused = train_teacher(DS, catalog, TINY, reuse=True)
    assert reused["reused"] and reused["version"] == chain["teacher"]["version"]


def test_identities_follow_exactly_the_settings_each_artifact_depends_on(chain):
    catalog, teacher = chain["catalog"], chain["catalog"].teacher(DS, TINY)
    change = lambda section, **values: dataclasses.replace(TINY, **{section: dataclasses.replace(getattr(TINY, section), **values)})  # noqa: E731
    # The exported teacher returns serving.top_k items: another K is another teacher.
    assert catalog.teacher(DS, change("serving", top_k=5)) != teacher
    assert catalog.teacher(DS, change("training", learning_rate=0.01)) != teacher
    # Student, distillation, soft-target and gate settings do not touch the teacher ...
    for other in (change("student", epochs=9), change("distill", alpha=0.25), change("soft_targets", top_k=7),
                  change("gate", min_change_vs_teacher=-0.5)):
        assert catalog.teacher(DS, other) == teacher
    # ... but soft targets follow their K, and the student follows the distillation settings.
    assert catalog.soft_targets(DS, change("soft_targets", top_k=7)) != catalog.soft_targets(DS, TINY)
    assert catalog.student(DS, change("distill", alpha=0.25)) != catalog.student(DS, TINY)
    assert catalog.student(DS, change("gate", min_change_vs_teacher=-0.5)) == catalog.student(DS, TINY)


def test_reuse_with_another_serving_k_trains_a_new_teacher(chain):
    from pipeline.steps.train_teacher import train_teacher

    other = dataclasses.replace(TINY, serving=dataclasses.replace(TINY.serving, top_k=5))
    result = train_teacher(DS, chain["catalog"], other, reuse=True)
    assert not result["reused"] and result["version"] != chain["teacher"]["version"]
    from pipeline.data.features import load_user_table

    user = load_user_table(chain["catalog"].features(DS)).user_ids[1:2].astype(str)
    scores, _ = tf.saved_model.load(f"{result['path']}/saved_model")(tf.constant(user))
    assert scores.shape == (1, 5)


def test_models_are_refitted_on_train_and_validation_for_the_selected_epochs(chain):
    for stage in ("teacher", "student"):
        meta = json.loads((Path(chain[stage]["path"]) / "metadata.json").read_text())
        assert meta["refit"]["splits"] == ["train", "validation"]
        assert meta["refit"]["epochs"] == meta["best_epoch"] == len(meta["refit"]["history"])
