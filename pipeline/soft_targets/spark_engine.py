"""The Spark engine of the batch soft targets: users scored in Spark's Python workers.

extract (the interactions of the known splits) -> :func:`user_batches_frame` (one row per
user: its known items and its scoring batch) -> score each batch in a worker
(:func:`score_batch`, the teacher restored once per worker) -> Spark writes Parquet parts ->
:func:`write_single_file` streams them, in ``user_idx`` order, into the one ``users.parquet``.

The batches are those of the numpy engine (batch ``b`` holds the users ranked
``b * batch_size`` to ``(b + 1) * batch_size - 1`` by ``user_idx``), because a score's last
bits depend on the batch it is computed in; so each batch is one group of a grouped Arrow
map (``applyInArrow``) rather than whatever rows a partition of ``mapInArrow`` holds.

The workers import this package and read the teacher and the features by path: on a
cluster, the project must be installed in the workers' Python (``make services`` runs them
on the project's virtualenv) and the data root on a file system they share.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.soft_targets.teacher_scoring import TeacherScorer, load_scorer, user_schema

log = logging.getLogger(__name__)

# The rows of ``users.parquet`` as Spark holds them (Spark has no fixed-size lists).
SPARK_USER_SCHEMA = ("user_idx int, user_id string, topk_item_idx array<int>, topk_scores array<float>, "
                     "teacher_user_embedding array<float>")

# Each Python worker restores a teacher once and keeps it for the following batches and tasks.
_SCORERS: dict[tuple[str, str, int, bool, int], TeacherScorer] = {}


def user_batches_frame(interactions: Any, splits: Sequence[str], batch_size: int) -> Any:
    """One row per user with interactions in ``splits``: ``user_idx``, ``known`` items, scoring ``batch``.

    A user's batch is its rank among these users (by ``user_idx``) divided by
    ``batch_size``. The rank is counted per block of ``batch_size`` consecutive indices (a
    block holds at most ``batch_size`` users) plus the users of the blocks before it: only
    the small table of block counts is ordered as a whole.

    Args:
        interactions: The feature set's interactions (``user_idx``, ``item_idx``, ``split``).
        splits: The splits whose items a user is known to have.
        batch_size: Users per batch.

    Returns:
        A DataFrame of ``user_idx int, known array<int>, batch long``.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    users = (
        interactions.where(F.col("split").isin(*splits))
        .groupBy(F.col("user_idx").cast("int").alias("user_idx"))
        .agg(F.collect_list(F.col("item_idx").cast("int")).alias("known"))
        .withColumn("block", F.floor(F.col("user_idx") / batch_size))
    )
    before = F.sum("users").over(Window.orderBy("block")) - F.col("users")  # one row per block: small
    offsets = users.groupBy("block").agg(F.count("*").alias("users")).select("block", before.alias("offset"))
    rank = F.col("offset") + F.row_number().over(Window.partitionBy("block").orderBy("user_idx")) - 1
    return (
        users.join(F.broadcast(offsets), on="block", how="inner")
        .select("user_idx", "known", F.floor(rank / batch_size).alias("batch"))
    )


def _scorer(teacher_dir: str, features_dir: str, top_k: int, selection_run: bool) -> TeacherScorer:
    """The worker's scorer of ``teacher_dir``, restored on first use (a re-exported teacher is restored again)."""
    key = (teacher_dir, features_dir, top_k, selection_run, (Path(teacher_dir) / "metadata.json").stat().st_mtime_ns)
    if key not in _SCORERS:
        _SCORERS.clear()  # one teacher at a time: each holds its user and item tables
        _SCORERS[key] = load_scorer(teacher_dir, features_dir, top_k, selection_run)
    return _SCORERS[key]


def _list_arrays(column: pa.ChunkedArray) -> list[np.ndarray]:
    """A ``list<int>`` column as one numpy array per row."""
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    return np.split(pc.list_flatten(column).to_numpy(zero_copy_only=False), np.cumsum(lengths)[:-1])


def score_batch(batch: pa.Table, teacher_dir: str, features_dir: str, top_k: int, selection_run: bool = False) -> pa.Table:
    """The soft-target rows of one scoring batch, in a Spark Python worker.

    Args:
        batch: One group of :func:`user_batches_frame` (``user_idx``, ``known``, ``batch``).
        teacher_dir: The exported teacher.
        features_dir: The features it was trained on.
        top_k: Candidates wanted per user.
        selection_run: Score with a refitted teacher's selection-run weights.

    Returns:
        The batch's rows as :data:`SPARK_USER_SCHEMA`, in ``user_idx`` order.
    """
    batch = batch.sort_by("user_idx")
    scorer = _scorer(teacher_dir, features_dir, top_k, selection_run)
    rows = scorer.score(batch.column("user_idx").to_numpy(), _list_arrays(batch.column("known")))
    return pa.Table.from_arrays(
        [col if not pa.types.is_fixed_size_list(col.type) else col.cast(pa.list_(col.type.value_type)) for col in rows.columns],
        names=rows.column_names)


def _row_groups(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """``tables`` regrouped into tables of ``rows`` rows (the last one possibly fewer)."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        pending.append(table)
        held += table.num_rows
        while held >= rows:
            merged = pa.concat_tables(pending)
            yield merged.slice(0, rows)
            pending, held = [merged.slice(rows)], held - rows
    if held:
        yield pa.concat_tables(pending)


def write_single_file(parts_dir: Path, out_file: Path, schema: pa.Schema, rows_per_group: int) -> int:
    """Stream Spark's Parquet parts, in part order, into one file of ``schema``.

    The parts must hold the rows in ascending ``user_idx`` order, part after part; they are
    written in row groups of ``rows_per_group`` rows (one scoring batch each, as the numpy
    engine writes them).

    Returns:
        The rows written.

    Raises:
        RuntimeError: When the parts are not in ``user_idx`` order.
    """
    parts = sorted(parts_dir.glob("part-*.parquet"))
    batches = (pa.Table.from_batches([b]) for part in parts for b in pq.ParquetFile(part).iter_batches())
    written, last = 0, -1
    with pq.ParquetWriter(out_file, schema) as writer:
        for table in _row_groups(batches, rows_per_group):
            users = table.column("user_idx").to_numpy()
            if users[0] <= last or np.any(np.diff(users) <= 0):
                raise RuntimeError(f"Spark's soft-target parts in {parts_dir} are not in user_idx order")
            writer.write_table(table.cast(schema))
            written, last = written + table.num_rows, int(users[-1])
    return written


def write_users_spark(spark: Any, scorer: TeacherScorer, teacher_dir: Path, features_dir: Path, batch_size: int,
                      out_file: Path) -> int:
    """Score every user with interactions in the teacher's known splits on Spark; write ``out_file``.

    Args:
        spark: The session.
        scorer: The driver's scorer (its ``k``, ``dim``, known splits and weights, which the workers restore).
        teacher_dir: The exported teacher, read by every worker.
        features_dir: The features it was trained on, read by every worker.
        batch_size: Users per scoring batch.
        out_file: The ``users.parquet`` to write (its directory holds Spark's parts meanwhile).

    Returns:
        The users written.
    """
    interactions = spark.read.parquet(str(features_dir / "interactions"))
    users = user_batches_frame(interactions, scorer.known_splits, batch_size)
    teacher, features, k, selection_run = str(teacher_dir), str(features_dir), scorer.k, scorer.selection_run

    def score(batch):  # no type hints and no functools.partial: pyspark 4.2 fails to infer the UDF type from them
        return score_batch(batch, teacher, features, k, selection_run)

    # Range partitions of the batch column satisfy the grouping without another shuffle, and
    # each partition hands its groups over in batch order: the parts come out in user_idx order.
    scored = users.repartitionByRange("batch").groupBy("batch").applyInArrow(score, schema=SPARK_USER_SCHEMA)
    parts_dir = out_file.with_name(f"_spark-{out_file.stem}")
    scored.write.mode("error").parquet(str(parts_dir))
    try:
        written = write_single_file(parts_dir, out_file, user_schema(scorer.k, scorer.dim), batch_size)
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
    log.info("soft targets: Spark scored %d users in batches of %d", written, batch_size)
    return written
