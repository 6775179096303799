"""Batch soft targets: the teacher's top-K per training user, with scores and embeddings.

``python -m pipeline.steps.soft_targets --ds ... [--config ...]`` writes, atomically, the
catalogue's soft-target directory of the teacher that the settings identify:

``users.parquet``, one row per user with train interactions, in ``user_idx`` order (the
user's known items are those of train, plus validation for a teacher refitted on both):

=========================  ===========================  =================================
column                     type                         meaning
=========================  ===========================  =================================
user_idx                   int32                        feature vocabulary index
user_id                    string                       original id
topk_item_idx              fixed_size_list<int32>[K]    teacher's top-K items, best first,
                                                        the user's known items excluded
topk_scores                fixed_size_list<float32>[K]  teacher scores (dot products)
teacher_user_embedding     fixed_size_list<float32>[D]  teacher query-tower output
=========================  ===========================  =================================

``items.parquet``: ``item_idx`` int32, ``item_id`` string, ``teacher_item_embedding``
fixed_size_list<float32>[D] for every item (the hint targets, and the teacher's score of
any sampled negative as a dot product). ``manifest.json``: teacher, K, D, row counts,
``logit_scale`` = 1 / the teacher's ``retrieval_temperature`` (its logits are scores times it),
the teacher's checkpoint that scored them (``teacher_weights``) and the ``known_splits``.

A teacher refitted on train + validation has seen the validation interactions a student's
selection run is judged on; its soft targets would point that run at them and bias its
epoch choice. So the same directory also holds, in ``selection/`` (the main manifest's
``selection_set``), the same three files scored with the teacher's selection-run weights
(trained on train only, train items excluded): a student selects its epochs on those and
refits on the main set. Both sets publish together, in one atomic rename.

Users are scored in batches of ``batch_size`` consecutive users, and only each row's top
K is sorted (:func:`pipeline.soft_targets.teacher_scoring.top_k_excluding`). Two engines
write the same rows, chosen by ``soft_targets.spark_master`` / ``spark_min_users``: ``numpy`` streams the
users with their known items out of the interactions (spilled by ``user_idx`` range,
:func:`pipeline.data.features.stream_user_items`) and scores them here; ``spark`` scores them
in Spark's Python workers (:mod:`pipeline.soft_targets.spark_engine`). The manifest and the
result name the engine. Scores repeat exactly for the same teacher and batches, so
re-running writes the same rows.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq

from pipeline import cli
from pipeline.catalog import SELECTION_SOFT_TARGETS, Catalog
from pipeline.config import PipelineConfig, SoftTargetConfig
from pipeline.data.features import count_users_with_interactions, stream_user_items
from pipeline.io import atomic_dir
from pipeline.soft_targets.spark_engine import write_users_spark
from pipeline.soft_targets.teacher_scoring import TeacherScorer, load_scorer, user_batches, user_schema
from pipeline.records import SoftTargetManifest
from pipeline.spark import spark_session

log = logging.getLogger(__name__)


def write_users_numpy(scorer: TeacherScorer, features_dir: Path, cfg: SoftTargetConfig, out_file: Path) -> int:
    """Score every user with interactions in the teacher's known splits here; write ``out_file``.

    Memory holds one batch's ``[batch_size, items]`` scores and one ``user_idx`` range of
    known pairs (about ``pairs_per_chunk``), whatever the number of users or interactions.

    Returns:
        The users written.
    """
    spill_dir = out_file.with_name(f"_spill-{out_file.stem}")
    chunks = stream_user_items(features_dir, scorer.known_splits, len(scorer.user_ids), spill_dir, cfg.pairs_per_chunk)
    written = 0
    with pq.ParquetWriter(out_file, user_schema(scorer.k, scorer.dim)) as writer:
        for users, known in user_batches(chunks, cfg.batch_size):
            writer.write_table(scorer.score(users, known))
            written += len(users)
            log.info("soft targets: %d users scored", written)
    shutil.rmtree(spill_dir, ignore_errors=True)
    return written


@contextlib.contextmanager
def _spark_for(engine: str, spark: Any, cfg: SoftTargetConfig) -> Iterator[Any]:
    """``spark``, or (for the Spark engine without one) a session of its own, stopped after."""
    if engine != "spark" or spark is not None:
        yield spark
        return
    own = spark_session("soft_targets", cfg.spark_master)
    try:
        yield own
    finally:
        own.stop()


def write_soft_target_set(ds: str, scorer: TeacherScorer, teacher_dir: Path, features_dir: Path, cfg: SoftTargetConfig,
                          engine: str, spark: Any, out_dir: Path, selection_set: str | None = None) -> SoftTargetManifest:
    """Write one set of soft targets (``users.parquet``, ``items.parquet``, ``manifest.json``) into ``out_dir``.

    Args:
        ds: Logical date.
        scorer: The teacher's weights that score (its known splits are excluded).
        teacher_dir: The exported teacher.
        features_dir: The features it was trained on.
        cfg: The ``soft_targets`` settings.
        engine: ``"numpy"`` or ``"spark"``.
        spark: The Spark engine's session.
        out_dir: Where the set goes (created).
        selection_set: The sub-directory of the selection run's set, named in the manifest.

    Returns:
        The set's manifest.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if engine == "spark":
        users = write_users_spark(spark, scorer, teacher_dir, features_dir, cfg.batch_size, out_dir / "users.parquet")
    else:
        users = write_users_numpy(scorer, features_dir, cfg, out_dir / "users.parquet")
    pq.write_table(scorer.items_table(), out_dir / "items.parquet")
    manifest = SoftTargetManifest(
        ds=ds, teacher_version=scorer.meta.version, teacher_dir=str(teacher_dir), k=scorer.k, dim=scorer.dim,
        logit_scale=1.0 / float(scorer.meta.config["training"]["retrieval_temperature"]), users=users,
        items=len(scorer.item_ids), features=str(features_dir), engine=engine, teacher_weights=scorer.weights,
        known_splits=list(scorer.known_splits), selection_set=selection_set)
    manifest.save(out_dir)
    log.info("soft targets from the teacher's %s (%s items excluded): %d users", scorer.weights,
             "+".join(scorer.known_splits), users)
    return manifest


def generate_soft_targets(ds: str, catalog: Catalog, cfg: PipelineConfig, spark: Any = None) -> dict:
    """Score every training user with the run's teacher and write the soft targets.

    A refitted teacher also scores, with its selection-run weights, the set in ``selection/``
    that a student's selection run learns from (see the module docstring).

    Args:
        ds: Logical date (the features the teacher was trained on).
        catalog: Where artifacts live; the teacher is the one ``cfg`` identifies.
        cfg: Settings (``soft_targets``, and the teacher's identity).
        spark: The session of the Spark engine; None: it starts (and stops) its own when it runs.

    Returns:
        ``{"path", "teacher_version", "users", "k", "dim", "engine", "seconds", "selection"}``;
        ``selection``: ``{"path", "users", "teacher_weights"}`` of the selection run's set, or None.

    Raises:
        ArtifactNotFound: When the teacher has not been trained, or was refitted without
            keeping its selection-run weights.
    """
    started = time.perf_counter()
    teacher_dir, features_dir = catalog.teacher(ds, cfg), catalog.features(ds)
    scorer = load_scorer(teacher_dir, features_dir, cfg.soft_targets.top_k)
    # The items each user is known to have had when the teacher last trained are excluded.
    expected = count_users_with_interactions(features_dir, scorer.known_splits)
    engine = cfg.soft_targets.engine(expected)
    log.info("soft targets: %d users with %s interactions, K=%d, engine %s", expected, "+".join(scorer.known_splits),
             scorer.k, engine)
    out = catalog.soft_targets(ds, cfg)
    selection_set = SELECTION_SOFT_TARGETS if scorer.meta.refitted else None
    selection = None
    with atomic_dir(out) as tmp, _spark_for(engine, spark, cfg.soft_targets) as session:
        manifest = write_soft_target_set(ds, scorer, teacher_dir, features_dir, cfg.soft_targets, engine, session, tmp,
                                         selection_set)
        if selection_set:
            del scorer  # one teacher in memory at a time
            chosen = write_soft_target_set(ds, load_scorer(teacher_dir, features_dir, cfg.soft_targets.top_k, selection_run=True),
                                           teacher_dir, features_dir, cfg.soft_targets, engine, session, tmp / selection_set)
            selection = {"path": str(out / selection_set), "users": chosen.users, "teacher_weights": chosen.teacher_weights}
    seconds = round(time.perf_counter() - started, 2)
    log.info("wrote soft targets for %d users (K=%d, %s%s) to %s in %.1fs", manifest.users, manifest.k, engine,
             ", and the selection run's" if selection else "", out, seconds)
    return {"path": str(out), "teacher_version": manifest.teacher_version, "users": manifest.users, "k": manifest.k,
            "dim": manifest.dim, "engine": engine, "seconds": seconds, "selection": selection}


def main(argv=None) -> int:
    return cli.run_step(generate_soft_targets, "Write the teacher's batch soft targets to Parquet.", argv)


if __name__ == "__main__":
    raise SystemExit(main())
