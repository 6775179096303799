"""One way to serve a model: its exported query tower, then its faiss serving index.

Everything that answers "top K items for these users" (the CLI, the evaluation's latency,
the serving benchmark) goes through :class:`ServingModel`, so what is measured is what is
served.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.serving.index import SERVING_INDEX_DIR, load_serving_index

SAVED_MODEL_FILE = "saved_model.pb"
SAVED_MODEL_DIR = "saved_model"  # the SavedModel inside a model's directory (a registry version is one itself)


@dataclass(frozen=True)
class ModelFiles:
    """Where a served model's two parts are.

    Attributes:
        saved_model: The retrieval SavedModel (``query_model``, ``item_vectors``, ``item_ids``).
        serving_index: Its faiss serving index, or None for a model exported before there was one.
    """

    saved_model: Path
    serving_index: Path | None


def locate_model(path: str | Path) -> ModelFiles:
    """The SavedModel and serving index of a model's directory (``saved_model/`` and
    ``serving_index/``), of a registry version (the SavedModel itself, with
    ``serving_index/`` inside) or of a model's ``saved_model/`` (the index beside it).

    Raises:
        FileNotFoundError: If ``path`` holds no SavedModel.
    """
    path = Path(path)
    if (path / SAVED_MODEL_FILE).is_file():
        saved_model = path
    elif (path / SAVED_MODEL_DIR / SAVED_MODEL_FILE).is_file():
        saved_model = path / SAVED_MODEL_DIR
    else:
        raise FileNotFoundError(f"{path} holds no SavedModel (no {SAVED_MODEL_FILE} in it or in {SAVED_MODEL_DIR}/)")
    candidates = (path / SERVING_INDEX_DIR, saved_model.parent / SERVING_INDEX_DIR)
    return ModelFiles(saved_model, next((c for c in candidates if c.is_dir()), None))


class ServingModel:
    """A model as served: user ids -> query vectors -> the faiss serving index -> top K.

    A known user's query vector is looked up in the table computed at export (the exported
    query tower answers the same for a user id until the next export: its history is part of
    it); an id the table lacks goes through the SavedModel's query tower.

    Args:
        saved_model: The loaded SavedModel (kept so its variables stay alive).
        index: The faiss index over the model's items; row ``r`` is ``item_ids[r]``.
        item_ids: ``[n]`` item ids.
        record: What the index is (:func:`pipeline.serving.build_serving_index`).
        files: Where they were loaded from.
        user_ids: ``[u]`` users whose query vectors were computed at export, or None.
        user_vectors: ``[u, d]`` those vectors.
    """

    def __init__(self, saved_model: Any, index: faiss.Index, item_ids: np.ndarray, record: dict, files: ModelFiles,
                 user_ids: np.ndarray | None = None, user_vectors: np.ndarray | None = None):
        import pandas as pd

        import tensorflow as tf

        self._tf = tf
        self.saved_model = saved_model
        self.index = index
        self.item_ids = np.asarray(item_ids).astype(str)
        self.record = record
        self.files = files
        self.users = None if user_ids is None else pd.Index(np.asarray(user_ids).astype(str))
        self.user_vectors = user_vectors

    @classmethod
    def load(cls, path: str | Path, threads: int = 2) -> "ServingModel":
        """Load the model at ``path`` (a model's directory or a registry version; see :func:`locate_model`).

        Args:
            path: Where the model is.
            threads: faiss's OpenMP threads for every search in this process (a process-wide
                setting: faiss has no per-index one).

        Raises:
            FileNotFoundError: If there is no SavedModel, or it was exported without a serving index.
        """
        import tensorflow as tf

        files = locate_model(path)
        if files.serving_index is None:
            raise FileNotFoundError(f"{path} has no {SERVING_INDEX_DIR}/: it was exported before serving indexes; "
                                    "serve its SavedModel or export it again")
        faiss.omp_set_num_threads(threads)
        saved = load_serving_index(files.serving_index)
        return cls(tf.saved_model.load(str(files.saved_model)), saved.index, saved.item_ids, saved.record, files,
                   saved.user_ids, saved.user_vectors)

    def query_vectors(self, user_ids: list[str] | np.ndarray) -> np.ndarray:
        """``[B, d]`` float32 query vectors: looked up for users known at export, from the query
        tower for the others (an id the model never saw gets the padding row's)."""
        ids = np.asarray(user_ids).astype(str).reshape(-1)
        if self.users is None:
            return self.tower_vectors(ids)
        rows = self.users.get_indexer(ids)
        known = rows >= 0
        vectors = np.empty((len(ids), self.index.d), dtype=np.float32)
        vectors[known] = self.user_vectors[rows[known]]
        if not known.all():
            vectors[~known] = self.tower_vectors(ids[~known])
        return vectors

    def tower_vectors(self, user_ids: np.ndarray) -> np.ndarray:
        """``[B, d]`` float32 query vectors from the SavedModel's query tower."""
        ids = self._tf.constant(np.asarray(user_ids).astype(str).reshape(-1))
        return np.ascontiguousarray(self.saved_model.query_model(ids).numpy(), dtype=np.float32)

    def top_k(self, user_ids: list[str] | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best items of each user: ``(scores [B, k] float32, item_ids [B, k] str)``, best first.

        ``k`` is cut to the number of items. An IVF index returns what its probed lists hold:
        should they hold fewer than ``k`` items, the missing places are item ``""`` scored ``-inf``.

        Raises:
            ValueError: If ``k < 1``.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores, rows = self.index.search(self.query_vectors(user_ids), min(k, self.index.ntotal))
        missing = rows < 0
        ids = np.where(missing, "", self.item_ids[np.where(missing, 0, rows)])
        return np.where(missing, -np.inf, scores).astype(np.float32), ids
