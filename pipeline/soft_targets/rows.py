"""The teacher's signal for distillation, read from a soft-target directory (format:
:mod:`pipeline.steps.soft_targets`) without holding every user's targets in memory.

The per-user columns (``topk_item_idx [K]``, ``teacher_user_embedding [D]``) are copied
once, record batch by record batch, into uncompressed ``.npy`` files in the step's scratch
directory and memory-mapped: a lookup gathers the rows of one record batch of interactions,
from pages the OS caches, not from the Python heap. Only the sorted ``user_idx`` column
(4 bytes a user) is held in memory, for the binary search that finds a user's row. (Not an
Arrow IPC file read with ``Table.take``: pyarrow 26 concatenates a multi-batch table's
column into one heap array on every ``take``, which loads every user again.)

The item side (``teacher_item_embedding [items, D]``) is read whole: items are far fewer
than users, and any batch may need any item (sampled negatives, the whole catalogue).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf

from pipeline.records import SoftTargetManifest

# Training-batch feature name -> its column in ``users.parquet``.
USER_COLUMNS = {"teacher_topk": "topk_item_idx", "teacher_user": "teacher_user_embedding"}


class MissingSoftTargets(LookupError):
    """Training interactions of users the soft targets do not cover."""


def _read_manifest(soft_targets_dir: str | Path) -> tuple[Path, SoftTargetManifest]:
    return Path(soft_targets_dir), SoftTargetManifest.load(soft_targets_dir)


class UserSoftTargets:
    """``user_idx [n]`` -> ``{"teacher_topk": [n, K] int32, "teacher_user": [n, D] float32}``.

    Pass it as ``user_columns`` to :func:`pipeline.modeling.training.interaction_dataset`, so each
    training pair carries its user's teacher top-K and embedding.

    Args:
        soft_targets_dir: A soft-target directory.
        scratch_dir: Where the memory-mapped copies go (``K + D`` 4-byte values a user); it
            must outlive every lookup.
        batch_rows: Rows copied at a time.

    Attributes:
        specs: ``name -> tf.TensorSpec([None, width])`` of each column, for a ``tf.data`` signature.

    Raises:
        ValueError: When ``users.parquet`` is not sorted by ``user_idx`` without repeats.
    """

    def __init__(self, soft_targets_dir: str | Path, scratch_dir: str | Path, batch_rows: int = 65_536):
        path, manifest = _read_manifest(soft_targets_dir)
        widths = {"teacher_topk": (manifest.k, np.int32), "teacher_user": (manifest.dim, np.float32)}
        self.path = path / "users.parquet"
        with pq.ParquetFile(self.path) as source:
            num_rows = source.metadata.num_rows
            self.user_idx = np.empty(num_rows, np.int32)
            files = {name: Path(scratch_dir) / f"{name}.npy" for name in USER_COLUMNS}
            copies = {name: np.lib.format.open_memmap(files[name], "w+", dtype, (num_rows, width))
                      for name, (width, dtype) in widths.items()}
            start = 0
            for batch in source.iter_batches(batch_size=batch_rows, columns=["user_idx", *USER_COLUMNS.values()]):
                rows = slice(start, start + batch.num_rows)
                self.user_idx[rows] = batch.column("user_idx").to_numpy()
                for name, column in USER_COLUMNS.items():
                    copies[name][rows] = batch.column(column).flatten().to_numpy().reshape(batch.num_rows, -1)
                start += batch.num_rows
        for copy in copies.values():
            copy.flush()
        del copies
        if np.any(np.diff(self.user_idx) <= 0):
            raise ValueError(f"{self.path}: user_idx must be strictly increasing (one row per user, sorted)")
        self.columns = {name: np.load(file, mmap_mode="r") for name, file in files.items()}
        self.specs = {name: tf.TensorSpec([None, widths[name][0]], tf.as_dtype(widths[name][1])) for name in USER_COLUMNS}

    def __call__(self, user_idx: np.ndarray) -> dict[str, np.ndarray]:
        """The rows of ``user_idx [n]`` (any order, repeats allowed) of every column.

        Raises:
            MissingSoftTargets: Naming the users that have no soft targets.
        """
        user_idx = np.asarray(user_idx)
        rows = np.searchsorted(self.user_idx, user_idx)
        found = rows < self.user_idx.size
        found[found] = self.user_idx[rows[found]] == user_idx[found]
        if not found.all():
            missing = np.unique(user_idx[~found])
            raise MissingSoftTargets(
                f"no soft targets for user_idx {missing[:10].tolist()}{' ...' if missing.size > 10 else ''} "
                f"({missing.size} users) in {self.path}: they cover the users the teacher trained on")
        return {name: np.asarray(column[rows]) for name, column in self.columns.items()}


@dataclasses.dataclass(frozen=True)
class TeacherItems:
    """The item side of the soft targets, held whole (items are far fewer than users).

    Attributes:
        embedding: ``[num_items, D]`` the teacher's candidate-tower output by ``item_idx``
            (zeros for an item without a row, such as padding 0).
        logit_scale: The teacher's scores times this are its logits (1 / its retrieval temperature).
        top_k: K, the teacher candidates of each user.
    """

    embedding: np.ndarray
    logit_scale: float
    top_k: int


def read_teacher_items(soft_targets_dir: str | Path, num_items: int) -> TeacherItems:
    """Read ``items.parquet`` into a table indexed by ``item_idx``, with the manifest's scale and K.

    Raises:
        ArtifactNotFound: When the soft targets have not been published.
    """
    path, manifest = _read_manifest(soft_targets_dir)
    dim = manifest.dim
    items = pq.read_table(path / "items.parquet", columns=["item_idx", "teacher_item_embedding"])
    embedding = np.zeros((num_items, dim), np.float32)
    embedding[items.column("item_idx").to_numpy()] = (
        items.column("teacher_item_embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim))
    return TeacherItems(embedding, float(manifest.logit_scale), int(manifest.k))
