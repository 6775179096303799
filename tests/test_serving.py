"""The serving index and the one serving path: index choice, nprobe tuning, exactness on a hand-made
example, save/load, ServingModel against the SavedModel, the registry's copy and serving.json, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import faiss
import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import ConfigError, EvalConfig, ServingConfig, load_config
from pipeline.evaluation import measure_latency
from pipeline.modeling.models import build_model, export_retrieval
from pipeline.registry import Registry
from pipeline.serving import (ServingModel, build_serving_index, probe_steps, load_serving_index, measure_serving, read_index_record,
                              save_serving_index)
from pipeline.serving.__main__ import main as serve_main
from tests.helpers import ITEMS, TINY_TOWER, USERS, saved_model

# Four 2-D items and one query (2, 1): scores 2*1 + 1*0 = 2, 0 + 1 = 1, 2 + 1 = 3, -2 + 0 = -2.
FOUR = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]], np.float32)
FOUR_IDS = np.array(["p", "q", "r", "s"])
QUERY = np.array([[2.0, 1.0]], np.float32)


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """``[n, dim]`` unit vectors around ``clusters`` random unit centres, noise of norm about 1."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(clusters, size=n)] + rng.normal(size=(n, dim)) / math.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def numpy_recall(index: faiss.Index, items: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Share of each query's true top ``k`` (numpy brute force) that ``index`` returns, averaged."""
    truth = np.argsort(-(queries @ items.T), axis=1)[:, :k]
    found = index.search(queries, k)[1]
    return float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found)]))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny two-tower model (2 users, 3 items) exported as the pipeline exports one:
    ``<dir>/saved_model`` and ``<dir>/serving_index``."""
    tf.keras.utils.set_random_seed(9)  # a seed whose users score the 3 items apart (no ties to order)
    model = build_model(USERS, ITEMS, TINY_TOWER, load_config().training, "m")
    model_dir = tmp_path_factory.mktemp("exported") / "model"
    export_retrieval(model, USERS, ITEMS, model_dir / "saved_model", ServingConfig(top_k=3), probe_user_ids=["a", "b"])
    return model_dir


@pytest.fixture()
def registry_root(tmp_path, exported) -> Path:
    """A data root whose registry has the tiny model as version 1, the champion."""
    Registry(tmp_path / "registry").promote(exported / "saved_model", {"run_key": "2024-01-01_a"})
    return tmp_path


# ---------------------------------------------------------------------- building the index
def test_the_index_is_exact_up_to_exact_max_items_and_ivf_above():
    cfg = ServingConfig(ann_exact_max_items=4, ann_nlist=2)
    _, small = build_serving_index(FOUR, FOUR_IDS, QUERY, cfg)
    assert (small["type"], small["faiss_class"], small["nlist"], small["nprobe"]) == ("exact", "IndexFlatIP", None, None)
    five, ids = np.vstack([FOUR, [[0.5, 0.5]]]).astype(np.float32), np.append(FOUR_IDS, "t")
    index, large = build_serving_index(five, ids, QUERY, cfg)
    assert (large["type"], large["faiss_class"], large["nlist"]) == ("ivf", "IndexIVFFlat", 2)
    assert isinstance(index, faiss.IndexIVFFlat) and index.ntotal == 5


def test_nprobe_is_the_fewest_reaching_the_target_recall_and_its_recall_is_remeasured():
    items, queries = clustered(4000, 16, 40, seed=1), clustered(300, 16, 40, seed=2)
    cfg = ServingConfig(ann_exact_max_items=0, ann_nlist=64, ann_target_recall=0.9)
    index, record = build_serving_index(items, np.arange(4000), queries, cfg)
    assert record["nprobe"] > 1  # one list would not do: the check below is not vacuous
    assert record["recall_at_100"] >= 0.9 and record["recall_k"] == 100 and record["probe_queries"] == 300
    assert index.nprobe == record["nprobe"]
    assert numpy_recall(index, items, queries, 100) == pytest.approx(record["recall_at_100"], abs=1e-9)
    steps = probe_steps(64)
    index.nprobe = steps[steps.index(record["nprobe"]) - 1]  # the next-smaller step misses the target
    assert numpy_recall(index, items, queries, 100) < 0.9


def test_probe_steps_are_powers_of_two_and_the_points_between_up_to_every_list():
    assert probe_steps(64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert probe_steps(20) == [1, 2, 3, 4, 6, 8, 12, 16, 20]
    assert probe_steps(1) == [1] and probe_steps(5) == [1, 2, 3, 4, 5]


def test_the_exact_index_equals_brute_force_by_hand():
    index, record = build_serving_index(FOUR, FOUR_IDS, QUERY, ServingConfig())
    scores, rows = index.search(QUERY, 3)
    # Scores 2, 1, 3, -2 (see FOUR): the top 3 are r (3), p (2), q (1).
    assert FOUR_IDS[rows[0]].tolist() == ["r", "p", "q"]
    np.testing.assert_allclose(scores[0], [3.0, 2.0, 1.0])
    assert record["recall_at_100"] == 1.0 and record["recall_k"] == 4  # only 4 items to return
    assert (record["items"], record["dim"], record["faiss_version"]) == (4, 2, faiss.__version__)


def test_the_same_seed_builds_the_same_ivf_index():
    items, queries = clustered(2000, 8, 20, seed=3), clustered(50, 8, 20, seed=4)
    cfg = ServingConfig(ann_exact_max_items=0, ann_nlist=16, seed=5)
    first, second = (build_serving_index(items, np.arange(2000), queries, cfg)[0] for _ in range(2))
    assert faiss.serialize_index(first).tobytes() == faiss.serialize_index(second).tobytes()


def test_bad_index_inputs_are_named():
    with pytest.raises(ValueError, match=r"item_ids \[n\], got \(4, 2\) and 3 ids"):
        build_serving_index(FOUR, FOUR_IDS[:3], QUERY, ServingConfig())
    with pytest.raises(ValueError, match=r"probe_queries \[m >= 1, 2\], got \(0, 2\)"):
        build_serving_index(FOUR, FOUR_IDS, QUERY[:0], ServingConfig())
    with pytest.raises(ValueError, match=r"serving.ann_nlist \(5\) exceeds the 4 items"):
        build_serving_index(FOUR, FOUR_IDS, QUERY, ServingConfig(ann_exact_max_items=0, ann_nlist=5))


@pytest.mark.parametrize("setting, message", [
    ({"ann_exact_max_items": -1}, "serving.ann_exact_max_items must be >= 0, got -1"),
    ({"ann_target_recall": 0.0}, r"serving.ann_target_recall must be in \(0, 1\], got 0.0"),
    ({"ann_target_recall": 1.5}, r"serving.ann_target_recall must be in \(0, 1\], got 1.5"),
    ({"ann_nlist": -2}, "serving.ann_nlist must be >= 0"),
    ({"ann_probe_users": 0}, "serving.ann_probe_users must be >= 1, got 0"),
])
def test_bad_serving_index_settings_are_named(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"serving": setting})


# ---------------------------------------------------------------------- saving and loading
def test_save_and_load_round_trip(tmp_path):
    index, record = build_serving_index(FOUR, FOUR_IDS, QUERY, ServingConfig())
    save_serving_index(tmp_path / "serving_index", index, FOUR_IDS, record)
    assert sorted(p.name for p in (tmp_path / "serving_index").iterdir()) == ["index.json", "item_ids.npy", "items.faiss"]
    loaded = load_serving_index(tmp_path / "serving_index")
    assert loaded.item_ids.tolist() == ["p", "q", "r", "s"] and loaded.record == record
    assert loaded.index.search(QUERY, 4)[1].tolist() == index.search(QUERY, 4)[1].tolist() == [[2, 0, 1, 3]]
    assert (tmp_path / "serving_index" / "items.faiss").stat().st_size == record["index_bytes"]
    assert read_index_record(tmp_path) == read_index_record(tmp_path / "serving_index") == record


def test_loading_where_there_is_no_index_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} holds no serving index"):
        load_serving_index(tmp_path)


# ---------------------------------------------------------------------- the served model
def test_export_writes_the_serving_index_beside_the_saved_model(exported):
    record = read_index_record(exported)
    assert (record["type"], record["items"], record["dim"], record["probe_queries"]) == ("exact", 3, 2, 2)
    assert load_serving_index(exported / "serving_index").item_ids.tolist() == ["x", "y", "z"]


def test_export_samples_the_probe_users_down_to_ann_probe_users(tmp_path):
    tf.keras.utils.set_random_seed(7)
    model = build_model(USERS, ITEMS, TINY_TOWER, load_config().training, "m")
    export_retrieval(model, USERS, ITEMS, tmp_path / "saved_model", ServingConfig(top_k=3, ann_probe_users=1))
    assert read_index_record(tmp_path)["probe_queries"] == 1  # of the 2 users


def test_serving_model_returns_the_saved_models_exact_top_k(exported):
    served = ServingModel.load(exported)
    scores, item_ids = served.top_k(["a", "b", "nobody"], 3)
    want_scores, want_ids = tf.saved_model.load(str(exported / "saved_model"))(tf.constant(["a", "b", "nobody"]))
    np.testing.assert_allclose(scores, want_scores.numpy(), rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) < -1e-3)  # no ties: the order is the model's, not a tie-break's
    assert item_ids.tolist() == want_ids.numpy().astype(str).tolist()
    assert served.top_k(["a"], 10)[1].shape == (1, 3)  # k is cut to the 3 items


def test_known_users_query_vectors_are_looked_up_and_equal_the_towers(exported):
    served = ServingModel.load(exported)
    assert served.users.tolist() == ["a", "b"] and served.record["user_vectors"] == 2
    ids = np.array(["b", "nobody", "a"])
    np.testing.assert_allclose(served.query_vectors(ids), served.tower_vectors(ids), rtol=1e-5, atol=1e-6)
    # A lookup, not the tower: a changed table row changes the answer for that user only.
    served.user_vectors = np.array(served.user_vectors) * 0.0
    assert not served.query_vectors(["a"]).any() and served.query_vectors(["nobody"]).any()


def test_serving_model_fails_clearly_without_an_index(tmp_path):
    saved_model(tmp_path, "saved_model")
    with pytest.raises(FileNotFoundError, match="has no serving_index/"):
        ServingModel.load(tmp_path)


def test_measure_serving_reports_each_batch_and_the_recall(exported):
    result = measure_serving(exported, np.array(["a", "b"]), batch_sizes=(1, 4), rounds=3)
    assert set(result["batches"]) == {1, 4} and result["recall_at_100"] == 1.0  # an exact index
    assert result["index_bytes"] == (exported / "serving_index" / "items.faiss").stat().st_size
    for timing in result["batches"].values():
        assert 0 < timing["latency_ms_p50"] <= timing["latency_ms_p99"] and timing["users_per_s"] > 0


def test_measure_latency_goes_through_the_serving_index(exported):
    cfg = dataclasses.replace(EvalConfig(), latency_batch_size=4, latency_repeats=3)
    result = measure_latency(exported / "saved_model", np.array(["a", "b"]), cfg)
    assert result["recall_at_100"] == 1.0 and result["index_bytes"] == read_index_record(exported)["index_bytes"]
    assert result["throughput_users_per_s"] == pytest.approx(4 / (result["latency_ms_p50"] / 1000))
    assert result["batch_size"] == 4


# ---------------------------------------------------------------------- the registry and the CLI
def test_the_registry_publishes_the_index_with_the_version_and_names_it_in_serving_json(registry_root, exported):
    version = registry_root / "registry" / "recsys_student" / "1"
    assert (version / "serving_index" / "items.faiss").read_bytes() == (exported / "serving_index" / "items.faiss").read_bytes()
    assert (version / "saved_model.pb").is_file()
    served = json.loads((registry_root / "registry" / "serving.json").read_text())
    assert served == {"models": {"recsys_student": {
        "champion": 1, "saved_model": "recsys_student/1", "serving_index": "recsys_student/1/serving_index",
        "index": read_index_record(exported)}}}


def test_serving_json_follows_a_rollback_to_a_version_without_an_index(tmp_path, exported):
    reg = Registry(tmp_path / "registry")
    reg.promote(saved_model(tmp_path / "old", "saved_model"), {"run_key": "2024-01-01_a"})  # exported before indexes
    assert not (tmp_path / "registry" / "serving.json").exists()  # nothing but TF Serving to describe
    reg.promote(exported / "saved_model", {"run_key": "2024-01-02_a"})
    reg.rollback()
    served = json.loads((tmp_path / "registry" / "serving.json").read_text())["models"]["recsys_student"]
    assert served == {"champion": 1, "saved_model": "recsys_student/1", "serving_index": None, "index": None}


def test_the_cli_prints_the_champions_top_k(registry_root, exported, capsys):
    assert serve_main(["--data-root", str(registry_root), "--model", "recsys_student", "--user-id", "a", "--k", "2"]) == 0
    scores, item_ids = ServingModel.load(exported).top_k(["a"], 2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "recsys_student version 1: exact index over 3 items"
    ranked = [f"  {rank:3d}  {item}  {score:.4f}" for rank, item, score in zip((1, 2), item_ids[0], scores[0])]
    assert lines[1:] == ["user a"] + ranked


def test_the_cli_fails_naming_a_missing_version(registry_root, capsys):
    assert serve_main(["--data-root", str(registry_root), "--version", "7", "--user-id", "a"]) == 1
    assert "recsys_student has no version 7 (have [1])" in capsys.readouterr().err
