"""Tiny inputs shared by several test modules: a fake SavedModel, two-user tables, a handful of
interactions, and the tiny DAG run. A test module imports these (or a fixture of
``tests/conftest.py``), never another test module; raw-log builders are in ``tests/rawlogs.py``."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import TowerConfig
from pipeline.data.features import ItemTable, UserTable
from pipeline.data.synthetic import generate_synthetic_logs
from pipeline.io import write_json


# ---------------------------------------------------------------------- models
def saved_model(directory: Path, name: str = "sm", payload: bytes = b"graph") -> Path:
    """A stand-in SavedModel directory ``directory/name``: ``saved_model.pb`` holding ``payload``
    and ``variables/variables.index``; enough for the registry, which copies it without loading."""
    path = directory / name
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(payload)
    (path / "variables" / "variables.index").write_bytes(b"index")
    return path


# 2 users + padding, 3 items + padding; side codes: age buckets up to 1, genders up to 1,
# occupations up to 2; year buckets up to 1, categories up to 2.
USERS = UserTable(user_ids=np.array(["", "a", "b"], dtype=object), history=np.array([[0, 0], [0, 1], [2, 3]], np.int32),
                  age_bucket=np.array([0, 1, 1], np.int32), gender=np.array([0, 1, 0], np.int32),
                  occupation=np.array([0, 1, 2], np.int32))
ITEMS = ItemTable(item_ids=np.array(["", "x", "y", "z"], dtype=object), year_bucket=np.array([0, 1, 1, 0], np.int32),
                  categories=np.array([[0, 0], [1, 0], [2, 1], [0, 0]], np.int32), popularity=np.array([0, 3, 2, 1], np.float32))
TINY_TOWER = TowerConfig(embedding_dim=2, side_dim=1, hidden_units=(3,), output_dim=2, dropout=0.0, l2=0.0)


# ---------------------------------------------------------------------- interactions
DAY = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
# (user_idx, item_idx, day of first touch, split). User 1 touched item 2, then 7 and 9 on one
# day (tie: item order), then 5; their validation item 8 comes last. User 2: item 4, then 3.
PAIRS = [(1, 5, 3, "train"), (1, 2, 1, "train"), (1, 9, 2, "train"), (2, 3, 5, "train"), (1, 7, 2, "train"),
         (2, 4, 1, "train"), (1, 8, 4, "validation")]


def write_interactions(root: Path) -> None:
    """Write :data:`PAIRS` as the features' ``interactions/split=train|validation`` under ``root``."""
    for split in ("train", "validation"):
        rows = [p for p in PAIRS if p[3] == split]
        table = pa.table({
            "user_idx": pa.array([r[0] for r in rows], pa.int32()),
            "item_idx": pa.array([r[1] for r in rows], pa.int32()),
            "weight": pa.array([1.0] * len(rows), pa.float64()),
            "first_ts": pa.array([DAY + dt.timedelta(days=r[2]) for r in rows], pa.timestamp("us", tz="UTC")),
        })
        (root / "interactions" / f"split={split}").mkdir(parents=True)
        pq.write_table(table, root / "interactions" / f"split={split}" / "part-0.parquet")


# ---------------------------------------------------------------------- the tiny DAG run
DAG_DS = "2024-01-31"  # the day the tiny DAG runs process
# Params of a tiny DAG run: small models and few epochs check wiring and safety, not quality.
TINY_PARAMS = {
    "window_days": 14, "teacher_epochs": 2, "student_epochs": 2,
    "student_ladder": [0.1, 0.3],  # two rungs: the ladder's mapped tasks, gate and choice run end to end
    "config_overrides": {
        "training": {"batch_size": 256, "patience": 1}, "soft_targets": {"top_k": 20}, "serving": {"top_k": 20},
        "distill": {"sampled_negatives": 20},
        "teacher": {"embedding_dim": 32, "hidden_units": [32], "output_dim": 32},
        "student": {"embedding_dim": 8, "hidden_units": [8], "output_dim": 8},
        "evaluate": {"als_rank": 8, "als_iterations": 3, "latency_repeats": 3, "latency_batch_size": 32},
    },
}


def generate_tiny_logs(raw: Path) -> None:
    """The synthetic raw logs of the tiny DAG run: 14 days up to :data:`DAG_DS` under ``raw``."""
    generate_synthetic_logs(raw, users=150, items=120, days=14, events=12_000, seed=3, end_date=DAG_DS)


# Each user touches 7 items on 7 days: the first 5 train, then one validation and one test item.
SPLIT_OF_DAY = ["train"] * 5 + ["validation", "test"]


def write_hand_features(features_dir: Path, ds: str, users: int = 10, items: int = 30, history_length: int = 3,
                        item_of=None) -> None:
    """A published feature set by hand: ``users`` users (ids ``u1``...), ``items`` items (``i1``...),
    7 pairs per user over 7 days: the first 5 train, then one validation and one test item;
    ``item_of(user, day)`` picks the item (default ``(3 * user + day) % items + 1``)."""
    item_of = item_of or (lambda user, day: (3 * user + day) % items + 1)
    day0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    pairs = [(u, item_of(u, day), day) for u in range(1, users + 1) for day in range(len(SPLIT_OF_DAY))]
    for split in dict.fromkeys(SPLIT_OF_DAY):
        rows = [p for p in pairs if SPLIT_OF_DAY[p[2]] == split]
        (features_dir / "interactions" / f"split={split}").mkdir(parents=True)
        pq.write_table(pa.table({
            "user_idx": pa.array([u for u, _, _ in rows], pa.int32()), "item_idx": pa.array([i for _, i, _ in rows], pa.int32()),
            "weight": pa.array([1.0] * len(rows), pa.float64()),
            "first_ts": pa.array([day0 + dt.timedelta(days=d) for _, _, d in rows], pa.timestamp("us", tz="UTC")),
        }), features_dir / "interactions" / f"split={split}" / "part-0.parquet")
    train = {u: [i for v, i, d in pairs if v == u and SPLIT_OF_DAY[d] == "train"] for u in range(1, users + 1)}
    for table, name in ((pa.table({
        "user_idx": pa.array(list(train), pa.int32()), "user_id": [f"u{u}" for u in train],
        "history_item_idx": pa.array([bought[-history_length:] for bought in train.values()], pa.list_(pa.int32())),
        "age": pa.array([20 + u for u in train], pa.int32()), "gender": ["f" if u % 2 else "m" for u in train],
        "occupation": ["a" if u % 3 else "b" for u in train],
        **{f"n_{split}": pa.array([SPLIT_OF_DAY.count(split)] * users, pa.int64()) for split in dict.fromkeys(SPLIT_OF_DAY)},
    }), "user_features"), (pa.table({
        "item_idx": pa.array(range(1, items + 1), pa.int32()), "item_id": [f"i{i}" for i in range(1, items + 1)],
        "year": pa.array([1980 + i for i in range(1, items + 1)], pa.int32()),
        "categories": [["drama"] if i % 2 else ["comedy"] for i in range(1, items + 1)],
        "popularity": pa.array([1] * items, pa.int32()),
    }), "item_features")):
        (features_dir / name).mkdir()
        pq.write_table(table, features_dir / name / "part-0.parquet")
    write_json(features_dir / "manifest.json", {"ds": ds, "config": {"history_length": history_length}, "tables": {},
                                                "counts": {"users": users, "items": items, "interactions": len(pairs)}})
