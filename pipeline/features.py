"""Reading the feature output of ``spark_jobs/extract_features.py`` with pyarrow.

Interactions are streamed in record batches (memory bounded by the batch, not the data);
per-user and per-item side tables are held as numpy arrays indexed by ``user_idx`` /
``item_idx`` (index 0 is padding), which grow with the vocabularies, not with events.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

SPLITS = ("train", "validation", "test")  # in time order: each is held out after the one before
AGE_BUCKETS = (18, 25, 35, 45, 55, 65)  # bucket 0: unknown; 1..7: <18, 18-24, ..., >=65
YEAR_BUCKETS = tuple(range(1930, 2030, 10))  # bucket 0: unknown


def read_manifest(features_dir: str | Path) -> dict:
    """The ``manifest.json`` the feature job wrote beside its tables."""
    return json.loads((Path(features_dir) / "manifest.json").read_text())


def _interactions(features_dir: str | Path) -> pads.Dataset:
    return pads.dataset(Path(features_dir) / "interactions", format="parquet", partitioning="hive")


def stream_interactions(features_dir: str | Path, split: str, batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """Record batches of ``user_idx``, ``item_idx``, ``weight`` of one split, in file order.

    The feature job writes interactions in a pseudo-random (hashed) order, so a streaming
    shuffle buffer mixes users well.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    scanner = _interactions(features_dir).scanner(
        columns=["user_idx", "item_idx", "weight"], filter=pc.field("split") == split, batch_size=batch_rows
    )
    for batch in scanner.to_batches():
        if batch.num_rows:
            yield batch


def load_split_pairs(features_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All ``(user_idx, item_idx)`` pairs of one split as two int32 arrays (for evaluation)."""
    table = _interactions(features_dir).to_table(columns=["user_idx", "item_idx"], filter=pc.field("split") == split)
    return table.column("user_idx").to_numpy().astype(np.int32), table.column("item_idx").to_numpy().astype(np.int32)


@dataclasses.dataclass(frozen=True)
class UserTable:
    """Per-user side inputs, row ``user_idx`` (row 0 is padding).

    Attributes:
        user_ids: ``[n_users]`` original ids (``""`` at 0).
        history: ``[n_users, history_length]`` last train items, 0-padded on the left.
        age_bucket, gender, occupation: ``[n_users]`` small integer ids (0 = unknown).
    """

    user_ids: np.ndarray
    history: np.ndarray
    age_bucket: np.ndarray
    gender: np.ndarray
    occupation: np.ndarray

    @property
    def size(self) -> int:
        return len(self.user_ids)


@dataclasses.dataclass(frozen=True)
class ItemTable:
    """Per-item side inputs, row ``item_idx`` (row 0 is padding).

    Attributes:
        item_ids: ``[n_items]`` original ids.
        year_bucket: ``[n_items]`` decade bucket (0 = unknown).
        categories: ``[n_items, max_categories]`` category ids, 0-padded.
        popularity: ``[n_items]`` train interactions.
    """

    item_ids: np.ndarray
    year_bucket: np.ndarray
    categories: np.ndarray
    popularity: np.ndarray

    @property
    def size(self) -> int:
        return len(self.item_ids)


def _codes(values: pa.Array) -> np.ndarray:
    """Strings -> ids 1..n in sorted order (0 for null), stable across runs. One per user."""
    strings = values.to_pylist()
    vocabulary = {v: i + 1 for i, v in enumerate(sorted({v for v in strings if v is not None}))}
    return np.array([vocabulary.get(v, 0) for v in strings], dtype=np.int32)


def load_user_table(features_dir: str | Path, history_length: int | None = None) -> UserTable:
    """Read ``user_features`` into a :class:`UserTable`.

    Args:
        features_dir: A published feature set.
        history_length: Items kept per history; the feature job's own setting by default.
    """
    history_length = history_length or read_manifest(features_dir)["config"]["history_length"]
    table = pads.dataset(Path(features_dir) / "user_features", format="parquet").to_table(
        columns=["user_idx", "user_id", "history_item_idx", "age", "gender", "occupation"]
    )
    n = int(pc.max(table.column("user_idx")).as_py() or 0) + 1
    rows = table.column("user_idx").to_numpy()
    user_ids = np.full(n, "", dtype=object)
    user_ids[rows] = table.column("user_id").to_numpy(zero_copy_only=False)
    history = np.zeros((n, history_length), dtype=np.int32)
    for row, items in zip(rows, table.column("history_item_idx").to_pylist()):
        items = (items or [])[-history_length:]
        if items:
            history[row, history_length - len(items):] = items
    age = table.column("age").to_numpy(zero_copy_only=False).astype(float)
    age_bucket = np.zeros(n, dtype=np.int32)
    age_bucket[rows] = np.where(np.isnan(age), 0, np.digitize(np.nan_to_num(age), AGE_BUCKETS) + 1)
    gender, occupation = np.zeros(n, np.int32), np.zeros(n, np.int32)
    gender[rows] = _codes(table.column("gender").combine_chunks())
    occupation[rows] = _codes(table.column("occupation").combine_chunks())
    return UserTable(user_ids, history, age_bucket, gender, occupation)


def load_item_table(features_dir: str | Path, max_categories: int = 4) -> ItemTable:
    """Read ``item_features`` into an :class:`ItemTable`."""
    table = pads.dataset(Path(features_dir) / "item_features", format="parquet").to_table(
        columns=["item_idx", "item_id", "year", "categories", "popularity"]
    )
    n = int(pc.max(table.column("item_idx")).as_py() or 0) + 1
    rows = table.column("item_idx").to_numpy()
    item_ids = np.full(n, "", dtype=object)
    item_ids[rows] = table.column("item_id").to_numpy(zero_copy_only=False)
    year = table.column("year").to_numpy(zero_copy_only=False).astype(float)
    year_bucket = np.zeros(n, dtype=np.int32)
    year_bucket[rows] = np.where(np.isnan(year), 0, np.digitize(np.nan_to_num(year), YEAR_BUCKETS) + 1)
    category_lists = table.column("categories").to_pylist()
    vocabulary = {c: i + 1 for i, c in enumerate(sorted({c for cats in category_lists for c in (cats or [])}))}
    categories = np.zeros((n, max_categories), dtype=np.int32)
    for row, cats in zip(rows, category_lists):
        codes = [vocabulary[c] for c in (cats or [])][:max_categories]
        categories[row, : len(codes)] = codes
    popularity = np.zeros(n, dtype=np.float32)
    popularity[rows] = table.column("popularity").to_numpy()
    return ItemTable(item_ids, year_bucket, categories, popularity)
