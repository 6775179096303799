"""The clean step of the feature job: exact duplicates removed, every quarantine rule of
:mod:`spark_jobs.event_rules` applied and its limit enforced, the raw GX suite run.

What it writes, it writes under the run's Data Docs directory: the raw suite's docs, and the
quarantined rows of a window rejected for them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from pathlib import Path

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipeline.config import FeatureConfig
from pipeline.data.contract import EVENT_ID_COPIES, RawWindowError
from pipeline.io import atomic_dir
from spark_jobs.event_rules import (
    BROADCAST_CONFLICTS_MAX, REPEATED_ID, conflicting_event_ids, deduplicate_events, flag_invalid_events,
    mark_repeated_ids, repeated_id_hashes, with_blank_id_flags, with_event_id_copies, with_id_hash, with_single_copy,
)
from spark_jobs.raw_inputs import RawInputs, spark_stage
from spark_jobs.validation import raw_events_suite, validate

log = logging.getLogger("extract_features")  # the job's log lines, under one name


@dataclasses.dataclass(frozen=True)
class CleanEvents:
    """The window's events once cleaned, and what cleaning counted.

    Attributes:
        valid: The distinct events no rule flagged (contract columns).
        quarantine: The flagged ones: contract columns and ``quarantine_reason``.
        raw_count: Events read (from the file footers: Spark reads exactly these rows).
        distinct_count: Events left once exact duplicates are removed.
        by_reason: Quarantined events per ``quarantine_reason``.
        checks: The raw GX suite's result under ``"raw"``; empty when it did not run.
    """

    valid: DataFrame
    quarantine: DataFrame
    raw_count: int
    distinct_count: int
    by_reason: dict[str, int]
    checks: dict[str, dict]


def clean(inputs: RawInputs, cfg: FeatureConfig, docs_root: Path, validate_data: bool = True) -> CleanEvents:
    """Remove exact duplicates, apply every quarantine rule and its limit, and run the raw GX suite.

    Args:
        inputs: The raw window (:func:`spark_jobs.extract_features.extract`).
        cfg: Feature settings (``min_events``, ``max_quarantine_share``).
        docs_root: Where the raw suite's Data Docs go (``raw/``), and the quarantined rows of a
            rejected window (``quarantine/``).
        validate_data: Run the raw GX suite.

    Raises:
        RawWindowError: A Spark failure on the input, fewer events than ``features.min_events``,
            or a quarantined share over ``features.max_quarantine_share``.
        DataValidationError: The raw GX suite failed.
    """
    raw_count = sum(f.rows for f in inputs.files)
    with spark_stage("reading raw events", inputs.where):  # e.g. a corrupt page surfaces only here
        flagged, distinct_count = flag_distinct_events(inputs.events, inputs.window_start, inputs.window_end)
    if distinct_count < cfg.min_events:
        raise RawWindowError(f"empty window: {distinct_count} event(s) in ds={inputs.window_start}..ds={inputs.window_end} "
                             f"under {inputs.events_dir}, need >= {cfg.min_events} (features.min_events)")
    log.info("events: %d raw, %d exact duplicates removed", raw_count, raw_count - distinct_count)
    checks: dict[str, dict] = {}
    if validate_data:
        raw_events = with_blank_id_flags(flagged.drop("quarantine_reason"))  # GX checks each rule on its own column
        suite = raw_events_suite(inputs.window_start, inputs.window_end, cfg)
        checks["raw"] = validate({"raw_events": raw_events}, {"raw_events": suite}, docs_root / "raw")
    quarantine = flagged.where(F.col("quarantine_reason").isNotNull()).drop(EVENT_ID_COPIES)  # the contract's columns and the reason
    with spark_stage("applying the quarantine rules", inputs.where):
        by_reason = {r["quarantine_reason"]: r["count"] for r in quarantine.groupBy("quarantine_reason").count().collect()}
    enforce_quarantine_limit(quarantine, by_reason, distinct_count, cfg, docs_root / "quarantine", inputs.where)
    if not by_reason:  # Spark writes the empty table (its schema) without scanning the events again
        quarantine = quarantine.limit(0)
    valid = flagged.where(F.col("quarantine_reason").isNull()).drop("quarantine_reason", EVENT_ID_COPIES)
    return CleanEvents(valid, quarantine, raw_count, distinct_count, by_reason, checks)


def enforce_quarantine_limit(quarantine: DataFrame, by_reason: dict[str, int], distinct_count: int, cfg: FeatureConfig,
                             rejected: Path, where: str) -> None:
    """Log the quarantined share; past ``features.max_quarantine_share``, keep the quarantined rows
    in ``rejected`` for inspection (no feature output is written) and fail.

    Raises:
        RawWindowError: Naming the share, the counts by reason, the limit and ``rejected``.
    """
    quarantined = sum(by_reason.values())
    share = quarantined / distinct_count
    log.info("quarantined %d of %d events (%.3f%%): %s", quarantined, distinct_count, 100 * share, by_reason or "none")
    if share <= cfg.max_quarantine_share:
        return
    with atomic_dir(rejected) as tmp:  # all of the rows or none, like every other output
        # "append": "overwrite" would delete the locked temporary directory and make a new one.
        quarantine.write.mode("append").parquet(str(tmp))
    raise RawWindowError(
        f"quarantined share {share:.2%} ({quarantined} of {distinct_count} events: {dict(sorted(by_reason.items()))}) exceeds "
        f"features.max_quarantine_share={cfg.max_quarantine_share:.2%} in {where}; rows written to {rejected}"
    )


def flag_distinct_events(events: DataFrame, window_start: dt.date, window_end: dt.date,
                         repeated_max: int = BROADCAST_CONFLICTS_MAX) -> tuple[DataFrame, int]:
    """The window's distinct events, flagged by every quarantine rule and cached, and how many there are.

    Only rows whose ``event_id`` hash is repeated (:func:`~spark_jobs.event_rules.repeated_id_hashes`)
    can be exact duplicates or conflicting copies: those alone are shuffled by ``event_id``
    and compared by content; every other row is cached as read, with no shuffle. When more
    than ``repeated_max`` hashes repeat (too many to broadcast, e.g. a day sent twice),
    every event is deduplicated by content instead.

    Returns:
        ``with_event_id_copies``' columns (contract columns, ``event_id_copies``,
        ``quarantine_reason``) and the count of distinct events.
    """
    # The one cached copy of the events, flagged by the row rules on the way in: every later
    # step scans it, and evaluating the rules costs more than a scan. The repeated hashes are
    # then found in the cache: a second scan of the files for event_id took 12 s at 10M events.
    hashed = flag_invalid_events(with_id_hash(events), window_start, window_end).cache()
    rows = hashed.count()
    repeated = repeated_id_hashes(hashed).cache()
    repeated_count, repeated_rows = repeated.agg(F.count(F.lit(1)), F.coalesce(F.sum("_rows"), F.lit(0))).first()
    if repeated_count > repeated_max:
        log.info("%d repeated event_id hashes (more than %d): every event deduplicated by content", repeated_count, repeated_max)
        hashed.unpersist()
        distinct = flag_invalid_events(deduplicate_events(events), window_start, window_end).cache()
        deduped_count = distinct.count()
        conflicting = conflicting_event_ids(distinct).cache()
        return with_event_id_copies(distinct, conflicting, broadcast=conflicting.count() <= BROADCAST_CONFLICTS_MAX), deduped_count
    marked = mark_repeated_ids(hashed, repeated)
    # Already flagged: the rules read only the contract columns, so copies alike by content share a reason.
    repeats = deduplicate_events(marked.where(F.col(REPEATED_ID)).drop(REPEATED_ID)).cache()
    repeats_count = repeats.count()
    log.info("%d row(s) share an event_id hash with another row: %d distinct by content", repeated_rows, repeats_count)
    # Conflicting ids are among the repeated hashes, so no more than repeated_max of them: broadcast.
    conflicting = conflicting_event_ids(repeats)
    singles = with_single_copy(marked.where(~F.col(REPEATED_ID)))
    return singles.unionByName(with_event_id_copies(repeats, conflicting, broadcast=True)), rows - repeated_rows + repeats_count
