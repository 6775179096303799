"""Reading the feature output of ``spark_jobs/extract_features.py`` with pyarrow.

Interactions are streamed in record batches (memory bounded by the batch, not the data);
per-user and per-item side tables are held as numpy arrays indexed by ``user_idx`` /
``item_idx`` (index 0 is padding), which grow with the vocabularies, not with events.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.records import FeatureManifest

SPLITS = ("train", "validation", "test")  # in time order: each is held out after the one before
AGE_BUCKETS = (18, 25, 35, 45, 55, 65)  # bucket 0: unknown; 1..7: <18, 18-24, ..., >=65
YEAR_BUCKETS = tuple(range(1930, 2030, 10))  # bucket 0: unknown


def read_manifest(features_dir: str | Path) -> FeatureManifest:
    """The ``manifest.json`` the feature job wrote beside its tables."""
    return FeatureManifest.load(features_dir)


def _interactions(features_dir: str | Path) -> pads.Dataset:
    return pads.dataset(Path(features_dir) / "interactions", format="parquet", partitioning="hive")


def stream_interactions(features_dir: str | Path, split: str | Sequence[str], batch_rows: int = 65_536,
                        columns: Sequence[str] = ("user_idx", "item_idx", "weight")) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns`` of one split's interactions (or several splits'), in file order.

    The feature job writes interactions in a pseudo-random (hashed) order, so a streaming
    shuffle buffer mixes users well.
    """
    splits = [split] if isinstance(split, str) else list(split)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    scanner = _interactions(features_dir).scanner(columns=list(columns), filter=pc.field("split").isin(splits),
                                                  batch_size=batch_rows)
    for batch in scanner.to_batches():
        if batch.num_rows:
            yield batch


def count_users_with_interactions(features_dir: str | Path, splits: Sequence[str]) -> int:
    """Users with at least one interaction in ``splits``, from ``user_features``' per-split counts."""
    total = functools.reduce(operator.add, [pc.field(f"n_{split}") for split in splits])
    return pads.dataset(Path(features_dir) / "user_features", format="parquet").count_rows(filter=total > 0)


def users_of_split(features_dir: str | Path, split: str) -> np.ndarray:
    """The sorted distinct ``user_idx`` with interactions in ``split``."""
    parts = [b.column("user_idx").to_numpy() for b in stream_interactions(features_dir, split, columns=("user_idx",))]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int32)


def user_index_bound(features_dir: str | Path, splits: Sequence[str]) -> int:
    """``1 +`` the largest ``user_idx`` among the interactions of ``splits`` (one column scan)."""
    batches = stream_interactions(features_dir, splits, columns=["user_idx"])
    largest = (pc.max(batch.column("user_idx")).as_py() for batch in batches)
    return 1 + max(largest, default=0)


# How stream_user_ranges spills each column ("split" as its position in SPLITS).
_RANGE_DTYPES = {"user_idx": np.int32, "item_idx": np.int32, "weight": np.float32, "split": np.int8}


def stream_user_ranges(features_dir: str | Path, splits: Sequence[str], n_users: int, spill_dir: str | Path,
                       pairs_per_chunk: int, columns: Sequence[str] = ("user_idx", "item_idx")) -> Iterator[np.ndarray]:
    """The interactions of ``splits``, one ``user_idx`` range at a time, each range sorted by ``user_idx``.

    The interactions are stored in hashed order, so a user's pairs are spread over every
    file. One pass appends each pair to the spill file of its ``user_idx`` range (ranges of
    about ``pairs_per_chunk`` pairs on average); each range is then read back and sorted.
    Memory holds one record batch or one range's pairs, and the data is read once (a scan
    per range, filtered on ``user_idx``, would read all of it once per range).

    Args:
        features_dir: A published feature set.
        splits: The splits whose pairs count.
        n_users: User vocabulary size (``user_idx`` < ``n_users``).
        spill_dir: A directory for the spill files (deleted as they are read back).
        pairs_per_chunk: About how many pairs a range holds.
        columns: Fields of the records, among ``user_idx`` (always kept), ``item_idx``,
            ``weight`` and ``split`` (int8, the position in :data:`SPLITS`).

    Yields:
        Structured arrays with ``columns`` as fields; ranges ascend, and within a range
        each user's pairs keep their stored order.
    """
    splits, columns = list(splits), ["user_idx", *(c for c in columns if c != "user_idx")]
    record = np.dtype([(c, _RANGE_DTYPES[c]) for c in columns])
    pairs = _interactions(features_dir).count_rows(filter=pc.field("split").isin(splits))
    width = max(1, -(-n_users // max(1, -(-pairs // pairs_per_chunk))))
    spill_dir = Path(spill_dir)
    spill_dir.mkdir(parents=True, exist_ok=True)
    spilled: set[int] = set()
    for batch in stream_interactions(features_dir, splits, columns=columns):
        rows = np.empty(batch.num_rows, dtype=record)
        for c in columns:
            values = pc.index_in(batch.column(c), pa.array(SPLITS)) if c == "split" else batch.column(c)
            rows[c] = values.to_numpy(zero_copy_only=False)
        chunk = rows["user_idx"] // width
        order = np.argsort(chunk, kind="stable")
        present, starts = np.unique(chunk[order], return_index=True)
        for c, positions in zip(present, np.split(order, starts[1:])):
            with open(spill_dir / f"{c}.pairs", "ab") as spill:
                rows[positions].tofile(spill)
            spilled.add(int(c))
    for c in sorted(spilled):
        path = spill_dir / f"{c}.pairs"
        rows = np.fromfile(path, dtype=record)
        path.unlink()
        yield rows[np.argsort(rows["user_idx"], kind="stable")]


def stream_user_items(features_dir: str | Path, splits: Sequence[str], n_users: int, spill_dir: str | Path,
                      pairs_per_chunk: int) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """Every user with interactions in ``splits``, in ``user_idx`` order, with its items; chunk by chunk.

    See :func:`stream_user_ranges` for the arguments and the memory bound.

    Yields:
        ``(users [m] int32 ascending, items)``: ``items[j]`` holds user ``users[j]``'s item indices.
    """
    for rows in stream_user_ranges(features_dir, splits, n_users, spill_dir, pairs_per_chunk):
        users, items = rows["user_idx"], np.ascontiguousarray(rows["item_idx"])
        firsts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        yield users[firsts], np.split(items, firsts[1:])


@dataclasses.dataclass(frozen=True)
class Sequences:
    """Every user's interactions of some splits in time order.

    Training uses the train split's (:meth:`histories`): at serving time a user's history
    ends before the items to recommend, and a train pair whose history already holds its own
    item (and later ones) teaches the model to recall the history instead, so each pair gets
    only what came before it. Export uses train + validation (:meth:`latest`): everything
    known before the held-out test items.

    Attributes:
        users: ``[n]`` ``user_idx`` of each entry, ascending.
        items: ``[n]`` ``item_idx``, each user's in the split's order (``first_ts``, then item id).
        rank: ``[n]`` each entry's position within its user's sequence.
        keys: ``[n]`` sorted ``user_idx * n_items + item_idx`` of every pair.
        key_position: ``[n]`` where the pair of ``keys[j]`` sits in ``items``.
        n_items: Item vocabulary size (with padding).
    """

    users: np.ndarray
    items: np.ndarray
    rank: np.ndarray
    keys: np.ndarray
    key_position: np.ndarray
    n_items: int

    def histories(self, user_idx: np.ndarray, item_idx: np.ndarray, length: int) -> np.ndarray:
        """``[batch, length]`` the items each pair's user touched before it, oldest first, 0-padded on the left.

        Raises:
            KeyError: When a pair is not among the sequences' interactions.
        """
        keys = user_idx.astype(np.int64) * self.n_items + item_idx
        slot = np.searchsorted(self.keys, keys)
        found = (slot < len(self.keys)) & (self.keys[np.minimum(slot, len(self.keys) - 1)] == keys)
        if not found.all():
            raise KeyError(f"{int((~found).sum())} pairs are not train interactions, e.g. "
                           f"(user_idx, item_idx)=({user_idx[~found][0]}, {item_idx[~found][0]})")
        position, rank = self.key_position[slot], self.rank[self.key_position[slot]]
        out = np.zeros((len(keys), length), dtype=np.int32)
        for back in range(1, length + 1):  # column length - back holds the item `back` steps earlier
            out[:, length - back] = np.where(rank >= back, self.items[np.maximum(position - back, 0)], 0)
        return out

    def latest(self, n_users: int, length: int) -> np.ndarray:
        """``[n_users, length]`` each user's last ``length`` items, oldest first, 0-padded on the left."""
        out = np.zeros((n_users, length), dtype=np.int32)
        users, start, count = np.unique(self.users, return_index=True, return_counts=True)
        for back in range(length):  # column length - 1 - back holds the item `back` before the last
            has = count > back
            out[users[has], length - 1 - back] = self.items[start[has] + count[has] - 1 - back]
        return out


def load_sequences(features_dir: str | Path, n_items: int, splits: tuple[str, ...] = ("train",)) -> Sequences:
    """Read the pairs of ``splits`` into :class:`Sequences` (memory grows with those pairs)."""
    table = _interactions(features_dir).to_table(columns=["user_idx", "item_idx", "first_ts"],
                                                 filter=pc.field("split").isin(list(splits)))
    users = table.column("user_idx").to_numpy().astype(np.int64)
    items = table.column("item_idx").to_numpy().astype(np.int32)
    first_ts = table.column("first_ts").cast(pa.int64()).to_numpy()
    order = np.lexsort((items, first_ts, users))  # item_idx follows the sorted item ids: the split's tie-break
    users, items = users[order], items[order]
    starts = np.r_[0, np.flatnonzero(np.diff(users)) + 1]
    rank = np.arange(len(users)) - np.repeat(starts, np.diff(np.r_[starts, len(users)]))
    keys = users * n_items + items
    key_order = np.argsort(keys, kind="stable")
    return Sequences(users, items, rank, keys[key_order], key_order, n_items)


def load_train_sequences(features_dir: str | Path, n_items: int) -> Sequences:
    """The train split's :class:`Sequences` (each train pair's causal history)."""
    return load_sequences(features_dir, n_items, ("train",))


def with_history_before_test(features_dir: str | Path, users: "UserTable", n_items: int) -> "UserTable":
    """``users`` with each history the last items of train + validation: all that is known before the test items.

    Exported models serve this history: the held-out test split is then scored from what a
    served model would know at that time, and in production the served history is the
    freshest the window holds short of the test items.
    """
    history = load_sequences(features_dir, n_items, ("train", "validation")).latest(users.size, users.history.shape[1])
    return dataclasses.replace(users, history=history)


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


def load_user_ids(features_dir: str | Path) -> np.ndarray:
    """``[n_users]`` original user ids, row ``user_idx`` (``""`` at 0): the users' vocabulary alone."""
    table = pads.dataset(Path(features_dir) / "user_features", format="parquet").to_table(columns=["user_idx", "user_id"])
    user_ids = np.full(int(pc.max(table.column("user_idx")).as_py() or 0) + 1, "", dtype=object)
    user_ids[table.column("user_idx").to_numpy()] = table.column("user_id").to_numpy(zero_copy_only=False)
    return user_ids


def load_user_table(features_dir: str | Path, history_length: int | None = None) -> UserTable:
    """Read ``user_features`` into a :class:`UserTable`.

    Args:
        features_dir: A published feature set.
        history_length: Items kept per history; the feature job's own setting by default.
    """
    history_length = history_length or read_manifest(features_dir).config["history_length"]
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
