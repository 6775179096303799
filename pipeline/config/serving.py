"""How the exported models serve: the SavedModel's own top-K index and the faiss serving index."""

from __future__ import annotations

import dataclasses

from pipeline.config.checks import _check


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """The exported retrieval SavedModels, their top-K index (:mod:`pipeline.modeling.retrieval`)
    and the faiss serving index built beside them (:mod:`pipeline.serving`).

    Attributes:
        top_k: Items an exported model returns per user.
        index: ``"brute_force"`` (exact; the faster one up to tens of thousands of items) or ``"ivf"``
            (k-means partitions, a query scores the probed ones; 2-3x faster at 100k items).
        num_partitions: IVF partitions; 0: about sqrt(items).
        probe_partitions: Partitions an IVF query scores (all: exact); 32: recall@100 >= 0.95 (bench/serving_cost.py).
        partition_capacity: Largest IVF partition / mean; the overflow spills to the next-best centroid.
        kmeans_iterations: Lloyd iterations of the IVF k-means.
        seed: Seed of the IVF k-means, of the SavedModel's index and of the faiss index alike.
        block_size: Brute force selects the top K by blocks of this many items (exact; see
            :func:`pipeline.modeling.retrieval.block_top_k`); 0: about sqrt(items / top_k) from
            100 items per result up (faster from about 10k items at top_k 100), else 1;
            1: one ``top_k`` over every item.
        ann_exact_max_items: The faiss serving index is exact (``IndexFlatIP``) up to this
            many items, an IVF index (``IndexIVFFlat``) above; see
            :func:`pipeline.serving.build_serving_index` for the measurement behind the default.
        ann_target_recall: An IVF serving index probes the fewest lists (1, 2, 3, 4, 6, 8, ...) whose
            recall@100 against exact search on the probe users' queries reaches this.
        ann_nlist: Lists (k-means cells) of an IVF serving index; 0: ``4 * sqrt(items)``.
        ann_probe_users: Most validation users whose query vectors choose (and measure)
            the serving index's ``nprobe``; more are sampled down to this, with ``seed``.
    """

    top_k: int = 100
    index: str = "brute_force"
    num_partitions: int = 0
    probe_partitions: int = 32
    partition_capacity: float = 1.5
    kmeans_iterations: int = 10
    seed: int = 0
    block_size: int = 0
    ann_exact_max_items: int = 5_000
    ann_target_recall: float = 0.95
    ann_nlist: int = 0
    ann_probe_users: int = 1_000

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, f"serving.top_k must be >= 1, got {self.top_k!r}")
        _check(self.block_size >= 0, f"serving.block_size must be >= 0, got {self.block_size!r}")
        _check(self.index in ("ivf", "brute_force"), f"serving.index must be 'ivf' or 'brute_force', got {self.index!r}")
        _check(min(self.num_partitions, self.kmeans_iterations) >= 0,
               f"serving.num_partitions and kmeans_iterations must be >= 0, got {self.num_partitions!r} and {self.kmeans_iterations!r}")
        _check(self.probe_partitions >= 1, f"serving.probe_partitions must be >= 1, got {self.probe_partitions!r}")
        _check(self.partition_capacity >= 1.0, f"serving.partition_capacity must be >= 1, got {self.partition_capacity!r}")
        _check(self.ann_exact_max_items >= 0, f"serving.ann_exact_max_items must be >= 0, got {self.ann_exact_max_items!r}")
        _check(0.0 < self.ann_target_recall <= 1.0,
               f"serving.ann_target_recall must be in (0, 1], got {self.ann_target_recall!r}")
        _check(self.ann_nlist >= 0, f"serving.ann_nlist must be >= 0 (0: 4 * sqrt(items)), got {self.ann_nlist!r}")
        _check(self.ann_probe_users >= 1, f"serving.ann_probe_users must be >= 1, got {self.ann_probe_users!r}")
