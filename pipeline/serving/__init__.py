"""Serving: a faiss index over a model's items, built when the model is exported, stored and
versioned with it in the registry, and the one way to ask a model for its top K.

* :mod:`~pipeline.serving.index`: build (exact or IVF, ``nprobe`` tuned to a target recall),
  save and load the serving index and its record;
* :mod:`~pipeline.serving.model`: :class:`ServingModel`, user ids -> query tower -> index -> top K;
* :mod:`~pipeline.serving.cost`: latency, users/s and recall of serving a model;
* ``python -m pipeline.serving`` (``recsys-serve``): a registry version's top K for user ids.
"""

from pipeline.serving.cost import WARMUP_CALLS, measure_serving, serving_recall, time_top_k
from pipeline.serving.index import (RECALL_K, SERVING_INDEX_DIR, SavedIndex, auto_nlist, build_serving_index, exact_top_k,
                                    load_serving_index, probe_steps, read_index_record, recall_at_k, save_serving_index)
from pipeline.serving.model import ModelFiles, ServingModel, locate_model

__all__ = [
    "RECALL_K", "SERVING_INDEX_DIR", "WARMUP_CALLS", "ModelFiles", "SavedIndex", "ServingModel", "auto_nlist",
    "build_serving_index", "exact_top_k", "load_serving_index", "locate_model", "measure_serving", "probe_steps",
    "read_index_record", "recall_at_k", "save_serving_index", "serving_recall", "time_top_k",
]
