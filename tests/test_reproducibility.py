"""Reproducible runs: the same inputs, settings and seed give the same features, models and
metrics, whatever process or Spark session computes them."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.data.features import stream_interactions
from pipeline.data.synthetic import generate_synthetic_logs
from spark_jobs import extract_features as job

REPO = Path(__file__).resolve().parents[1]
DS = "2024-01-31"
SHUFFLE_PARTITIONS = "spark.sql.shuffle.partitions"
SETTINGS = {
    # Three shuffle partitions where the test session has two: the job must follow the settings.
    "features": {"window_days": 14, "shuffle_partitions": 3},
    "training": {"batch_size": 256, "patience": 1},
    "teacher": {"embedding_dim": 32, "hidden_units": [32], "output_dim": 32, "epochs": 2},
    "student": {"embedding_dim": 8, "hidden_units": [8], "output_dim": 8, "epochs": 2},
    "distill": {"sampled_negatives": 10, "ladder": []}, "soft_targets": {"top_k": 20}, "serving": {"top_k": 20},
}
CFG = load_config(SETTINGS)

# One run in a fresh process: teacher -> soft targets -> student -> evaluation on the test
# split (no ALS, which would start a Spark session, and no latency). It saves the exported
# models' item vectors and every user's query vector, and prints what it measured.
RUN = f"""
import json, sys
from pathlib import Path
import numpy as np
from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.data.features import load_user_ids
from pipeline.steps.chain import run_chain
from pipeline.steps.evaluate import evaluate_run, run_models
import tensorflow as tf  # after pipeline, which switches TensorFlow to tf_keras

root = Path(sys.argv[1])
catalog, cfg = Catalog(root), load_config(json.loads(sys.argv[2]))
chain = run_chain({DS!r}, catalog, cfg)
evaluation = evaluate_run({DS!r}, catalog, cfg, run_models({DS!r}, catalog, cfg), baselines=False, latency=False)
user_ids = tf.constant(load_user_ids(catalog.features({DS!r}))[1:].astype(str))
meta = {{}}
for role in ("teacher", "student"):
    path = Path(chain[role]["path"])
    model = tf.saved_model.load(str(path / "saved_model"))
    np.save(root / f"{{role}}_items.npy", model.item_vectors.numpy())
    np.save(root / f"{{role}}_users.npy", model.query_model(user_ids).numpy())
    meta[role] = json.loads((path / "metadata.json").read_text())
print(json.dumps({{"test": evaluation["models"], "meta": meta, "soft_targets": chain["soft_targets"]["path"]}}))
"""


@contextlib.contextmanager
def session_shuffle_partitions(spark, partitions: int | None = None):
    """The shared session's shuffle partitions set to ``partitions`` (if given) for the block, then restored."""
    before = spark.conf.get(SHUFFLE_PARTITIONS)
    if partitions is not None:
        spark.conf.set(SHUFFLE_PARTITIONS, str(partitions))
    try:
        yield
    finally:
        spark.conf.set(SHUFFLE_PARTITIONS, before)


def extract(spark, root: Path) -> Path:
    """The tiny synthetic log's raw files and features under ``root``; returns the features."""
    catalog = Catalog(root)
    generate_synthetic_logs(catalog.raw, users=120, items=80, days=14, events=8_000, seed=5, end_date=DS)
    job.run(spark, catalog.raw, catalog.features_root, dt.date.fromisoformat(DS), CFG.features, validate_data=False)
    return catalog.features(DS)


def stored_order(features_dir: Path) -> list[tuple[int, int]]:
    """Every interaction ``(user_idx, item_idx)`` in the order a trainer streams them."""
    return [pair for batch in stream_interactions(features_dir, ("train", "validation", "test"))
            for pair in zip(batch.column("user_idx").to_pylist(), batch.column("item_idx").to_pylist())]


def without_timings(history: list[dict]) -> list[dict]:
    """A training history's epochs without their ``seconds``."""
    return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in history]


@pytest.fixture(scope="module")
def features(spark, tmp_path_factory) -> Path:
    """The tiny log's features, extracted on the shared test session (two shuffle partitions; the settings say three)."""
    with session_shuffle_partitions(spark):
        return extract(spark, tmp_path_factory.mktemp("reproducible") / "data")


def test_feature_order_follows_the_settings_not_the_session(features, spark, tmp_path):
    with session_shuffle_partitions(spark, 5):
        again = extract(spark, tmp_path / "data")
    assert stored_order(again) == stored_order(features)
    assert len(list((again / "interactions" / "split=train").glob("part-*.parquet"))) == 3
    assert json.loads((again / "manifest.json").read_text()) == json.loads((features / "manifest.json").read_text())


def test_a_second_process_trains_and_evaluates_the_same_models(features, tmp_path):
    roots = [tmp_path / "first" / "data", tmp_path / "second" / "data"]
    for root in roots:
        shutil.copytree(features, Catalog(root).features_root / f"ds={DS}")
    started = time.perf_counter()
    # Side by side, each with its own string hashing, data root and share of the cores.
    runs = [subprocess.Popen([sys.executable, "-c", RUN, str(root), json.dumps(SETTINGS)], cwd=REPO,
                             env={**os.environ, "PYTHONHASHSEED": str(seed), "TF_CPP_MIN_LOG_LEVEL": "2"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for seed, root in enumerate(roots, start=1)]
    outputs = []
    try:
        for proc in runs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(f"\ntwo tiny chains side by side: {time.perf_counter() - started:.1f}s")
    first, second = outputs

    assert first["test"] == second["test"]  # every metric of teacher and student, exactly
    assert first["test"]["student_kd"]["users"] > 50
    for role in ("teacher", "student"):
        a, b = first["meta"][role], second["meta"][role]
        assert a["version"] == b["version"] and a["metrics"] == b["metrics"]
        assert without_timings(a["history"]) == without_timings(b["history"])
        assert without_timings(a["refit"]["history"]) == without_timings(b["refit"]["history"])
        assert a["runtime"] == b["runtime"] and a["runtime"]["op_determinism"]
        for vectors in ("items", "users"):
            np.testing.assert_array_equal(np.load(roots[0] / f"{role}_{vectors}.npy"), np.load(roots[1] / f"{role}_{vectors}.npy"))
    soft_targets = [pq.read_table(Path(run["soft_targets"]) / "users.parquet") for run in outputs]
    assert soft_targets[0].equals(soft_targets[1])


def test_saved_model_bytes_leave_out_the_random_fingerprint(tmp_path):
    from pipeline.evaluation import directory_bytes, saved_model_bytes

    (tmp_path / "variables").mkdir()
    (tmp_path / "saved_model.pb").write_bytes(b"abc")
    (tmp_path / "variables" / "variables.index").write_bytes(b"12345")
    (tmp_path / "fingerprint.pb").write_bytes(b"uuid-38")
    assert (directory_bytes(tmp_path), saved_model_bytes(tmp_path)) == (3 + 5 + 7, 3 + 5)
    (tmp_path / "fingerprint.pb").write_bytes(b"uuid-039")  # another export of the same model
    assert saved_model_bytes(tmp_path) == 3 + 5
