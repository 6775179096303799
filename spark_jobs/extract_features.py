"""Feature extraction over one window of raw user-behaviour logs.

Runs the same way under ``spark-submit spark_jobs/extract_features.py ...`` (any master,
set by spark-submit) and ``python -m spark_jobs.extract_features ...`` (own session,
``--master`` or the config's ``features.spark_master``). Only :func:`main` knows paths:
extract (read the window: :mod:`spark_jobs.raw_inputs`) -> clean (exact duplicates and the
quarantine rules: :mod:`spark_jobs.event_rules`) -> transform (:mod:`spark_jobs.feature_transforms`)
-> load (atomic write).

Output, under ``<out>/ds=<ds>/`` (renamed into place only after every check passed)::

    interactions/split=<train|validation|test>/   one row per (user, item); user_features/ item_features/ user_vocab/ item_vocab/
    quarantine/                                   invalid rows, with the reason
    manifest.json                                 counts, schemas, input files, config

GX Data Docs go to ``<out>/_validation/ds=<ds>/`` whether the run passes or fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as dt
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file by spark-submit: make `pipeline` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.catalog import OutsideDataRoot, confine, date_partition, validation_docs  # noqa: E402
from pipeline.config import ConfigError, FeatureConfig, load_config, parse_ds  # noqa: E402
from pipeline.data.contract import EVENT_ID_COPIES, RawWindowError  # noqa: E402
from pipeline.features import SPLITS  # noqa: E402
from pipeline.io import atomic_dir  # noqa: E402
from pipeline.spark import spark_session  # noqa: E402
from pipeline.validation import (  # noqa: E402
    DataValidationError, feature_suites, raw_events_suite, validate, with_pair_key,
)
from spark_jobs.event_rules import (  # noqa: E402
    BROADCAST_CONFLICTS_MAX, REPEATED_ID, conflicting_event_ids, deduplicate_events, flag_invalid_events,
    mark_repeated_ids, repeated_id_hashes, with_blank_id_flags, with_event_id_copies, with_id_hash, with_single_copy,
)
from spark_jobs.feature_transforms import transform  # noqa: E402
from spark_jobs.raw_inputs import read_raw, spark_stage  # noqa: E402

from pyspark.sql import DataFrame, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

log = logging.getLogger("extract_features")

MIN_SPLITS_CONF = "spark.sql.files.minPartitionNum"
SHUFFLE_PARTITIONS_CONF = "spark.sql.shuffle.partitions"


def write_tables(tables: dict[str, DataFrame], directory: Path) -> tuple[dict[str, dict], dict[str, int]]:
    """Write each table as Parquet, rows sorted so that a re-run writes the same content.

    ``interactions`` goes to one ``split=<split>/`` directory per split that has rows (the
    layout ``partitionBy("split")`` writes).

    Returns:
        Table name -> ``{"schema"}`` for the manifest, and the interactions' rows per split.
    """
    # Interactions go in a hashed (pseudo-random but fixed) order so that a trainer's streaming
    # shuffle buffer sees many users at once; the other tables are sorted by their key.
    keys = {"interactions": [F.xxhash64("user_idx", "item_idx"), "user_idx", "item_idx"], "user_features": ["user_idx"],
            "item_features": ["item_idx"], "user_vocab": ["user_idx"], "item_vocab": ["item_idx"], "quarantine": ["event_id", "event_ts"]}
    interactions = tables["interactions"]
    # Counting the splits fills the caches every table is built from; then all are written side by side.
    split_rows = {r["split"]: r["count"] for r in interactions.groupBy("split").count().collect()}
    # One write per split, as the transform partitioned the rows (by user): no shuffle, and each
    # task sorts by the hash first, a long Spark compares by its prefix alone. partitionBy would
    # sort by the split's name first, equal for most rows: 2.3x slower at 3.6M pairs.
    writes = [(interactions.where(F.col("split") == split).drop("split").sortWithinPartitions(*keys["interactions"]),
               directory / "interactions" / f"split={split}") for split in sorted(split_rows)]
    writes += [(frame.repartition(1, *keys[name]).sortWithinPartitions(*keys[name]), directory / name)
               for name, frame in tables.items() if name != "interactions"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(writes)) as pool:
        list(pool.map(lambda write: write[0].write.mode("error").parquet(str(write[1])), writes))  # re-raises the first failure
    return {name: {"schema": [[f.name, f.dataType.simpleString()] for f in frame.schema.fields]} for name, frame in tables.items()}, split_rows


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


def run(spark: SparkSession, raw_root: str | Path, out_root: str | Path, ds: dt.date, cfg: FeatureConfig,
        validate_data: bool = True, allowed_root: str | Path | None = None) -> dict:
    """Extract, check, transform and publish one ``ds``.

    Args:
        spark: The session to use; its ``spark.sql.shuffle.partitions`` becomes ``cfg.shuffle_partitions``.
        raw_root: Raw root (``events/``, ``items/``, ``users/``).
        out_root: Feature root; the result lands in ``<out_root>/ds=<ds>/``.
        ds: Logical date; the window ends on it.
        cfg: Feature settings.
        validate_data: Run the GX suites (the benchmark turns this off to time the transform alone).
        allowed_root: What every path read or written must resolve inside, symlinks followed
            (the run's data root); by default the inputs stay in ``raw_root``, the outputs in ``out_root``.

    Returns:
        The manifest (also written as ``manifest.json``).

    Raises:
        RawWindowError: Structural faults, a Spark failure on the input (naming the file,
            column and rule Spark reports), or too many quarantined rows.
        DataValidationError: A GX suite failed.
        OutsideDataRoot: A path resolves outside ``allowed_root``.
    """
    started = time.perf_counter()
    raw_root, out_root = Path(raw_root), Path(out_root)
    window_start, window_end = cfg.window(ds)
    final_dir, docs_root = date_partition(out_root, ds.isoformat()), validation_docs(out_root, ds.isoformat())
    for path in (final_dir, docs_root):
        confine(path, allowed_root or out_root)
    shutil.rmtree(docs_root, ignore_errors=True)  # the docs describe this run only
    inputs = read_raw(spark, raw_root, window_start, window_end, allowed_root)
    if spark.conf.get(MIN_SPLITS_CONF, None) is None:
        # At least two input splits per core: Spark's default (one per core, capped at 128 MB)
        # gave 3 splits of the 10M-event window to 2 cores, one core idle for a third of the read
        # (Spark sizes the splits when the scan runs, after every path was checked).
        spark.conf.set(MIN_SPLITS_CONF, str(2 * spark.sparkContext.defaultParallelism))
    # The interactions are stored partition by partition, so their order (the order a trainer
    # reads them in, and so the trained weights) follows the shuffle partitions: those of the
    # settings the manifest records, not those of whatever session the caller passed.
    spark.conf.set(SHUFFLE_PARTITIONS_CONF, str(cfg.shuffle_partitions))
    events_dir = raw_root / "events"
    where = f"{len(inputs.files)} event file(s) in ds={window_start}..ds={window_end} under {events_dir}"
    log.info("read %d partition(s), %s", len(inputs.partitions), where)

    raw_count = sum(f.rows for f in inputs.files)  # from the footers: Spark reads exactly these rows
    with spark_stage("reading raw events", where):  # e.g. a corrupt page surfaces only here
        flagged, deduped_count = flag_distinct_events(inputs.events, window_start, window_end)
    if deduped_count < cfg.min_events:
        raise RawWindowError(f"empty window: {deduped_count} event(s) in ds={window_start}..ds={window_end} under {events_dir}, "
                             f"need >= {cfg.min_events} (features.min_events)")
    log.info("events: %d raw, %d exact duplicates removed", raw_count, raw_count - deduped_count)
    checks: dict[str, dict] = {}
    if validate_data:
        raw_events = with_blank_id_flags(flagged.drop("quarantine_reason"))  # GX checks each rule on its own column
        checks["raw"] = validate({"raw_events": raw_events}, {"raw_events": raw_events_suite(window_start, window_end, cfg)}, docs_root / "raw")
    quarantine = flagged.where(F.col("quarantine_reason").isNotNull()).drop(EVENT_ID_COPIES)  # the contract's columns and the reason
    with spark_stage("applying the quarantine rules", where):
        by_reason = {r["quarantine_reason"]: r["count"] for r in quarantine.groupBy("quarantine_reason").count().collect()}
    quarantined = sum(by_reason.values())
    share = quarantined / deduped_count
    log.info("quarantined %d of %d events (%.3f%%): %s", quarantined, deduped_count, 100 * share, by_reason or "none")
    if share > cfg.max_quarantine_share:
        rejected = docs_root / "quarantine"  # kept for inspection; no feature output is written
        with atomic_dir(rejected) as tmp:  # all of the rows or none, like every other output
            # "append": "overwrite" would delete the locked temporary directory and make a new one.
            quarantine.write.mode("append").parquet(str(tmp))
        raise RawWindowError(
            f"quarantined share {share:.2%} ({quarantined} of {deduped_count} events: {dict(sorted(by_reason.items()))}) exceeds "
            f"features.max_quarantine_share={cfg.max_quarantine_share:.2%} in {where}; rows written to {rejected}"
        )
    if not quarantined:  # Spark writes the empty table (its schema) without scanning the events again
        quarantine = quarantine.limit(0)
    valid = flagged.where(F.col("quarantine_reason").isNull()).drop("quarantine_reason", EVENT_ID_COPIES)
    tables = transform(valid, inputs.items, inputs.users, window_end, cfg)

    try:
        with spark_stage("building the feature tables", where), atomic_dir(final_dir) as tmp_dir:
            schemas, split_counts = write_tables({**tables.as_dict(), "quarantine": quarantine}, tmp_dir)
            written = {name: spark.read.parquet(str(tmp_dir / name)) for name in schemas}
            if validate_data:
                frames = {n: with_pair_key(written[n]) if n == "interactions" else written[n] for n in tables.as_dict()}
                checks["features"] = validate(frames, feature_suites(), docs_root / "features")
            over_cap = tables.over_cap.first()
            if over_cap["users"]:
                log.warning("%d user(s) over features.max_user_interactions=%d: %d oldest interaction(s) dropped",
                            over_cap["users"], cfg.max_user_interactions, over_cap["interactions"])
            manifest = {
                "ds": ds.isoformat(),
                "window": {"start": window_start.isoformat(), "end": window_end.isoformat()},
                "input_partitions": [p.name for p in inputs.partitions],
                "input_files": [f.path.relative_to(events_dir).as_posix() for f in inputs.files],
                "counts": {
                    "raw_events": raw_count,
                    "exact_duplicates": raw_count - deduped_count,
                    "duplicate_item_ids": inputs.duplicate_ids["items"],
                    "duplicate_user_ids": inputs.duplicate_ids["users"],
                    "quarantined": quarantined,
                    "quarantined_by_reason": dict(sorted(by_reason.items())),
                    "valid_events": deduped_count - quarantined,
                    "interactions_by_split": {s: split_counts.get(s, 0) for s in SPLITS},
                    "users_over_cap": over_cap["users"], "interactions_over_cap": over_cap["interactions"],
                },
                "tables": {name: {"rows": written[name].count(), **schemas[name]} for name in schemas},
                "validation": checks,
                "config": dataclasses.asdict(cfg),
                "spark_version": spark.version,
            }
            (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    finally:
        spark.catalog.clearCache()
    log.info("wrote %s in %.1fs: %s", final_dir, time.perf_counter() - started, {n: t["rows"] for n, t in manifest["tables"].items()})
    return manifest


def session_conf(cfg: FeatureConfig) -> dict[str, str]:
    """The Spark settings the job's own session starts with."""
    # Uncompressed in-memory cache: the job caches the distinct events and the capped
    # interactions once each and scans them several times; at 10M events (local[2]) caching
    # the events took 23.5 s uncompressed against 32.3 s compressed, for about 0.7 GB of
    # memory (spilled to disk past the storage share, as any cache).
    return {"spark.driver.memory": cfg.driver_memory, "spark.sql.inMemoryColumnarStorage.compressed": "false"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True, help="raw root with events/, items/, users/")
    parser.add_argument("--out", required=True, help="feature root; writes <out>/ds=<ds>/")
    parser.add_argument("--ds", required=True, help="logical date YYYY-MM-DD (the window's last day)")
    parser.add_argument("--config", help="pipeline config JSON file")
    parser.add_argument("--config-json", help="nested settings as a JSON string, applied after --config")
    parser.add_argument("--window-days", type=int, help="override features.window_days")
    parser.add_argument("--master", help="Spark master when not run by spark-submit (default: config)")
    parser.add_argument("--allowed-root", help="every path must resolve inside it, symlinks followed (default: --raw for inputs, --out for outputs)")
    parser.add_argument("--no-validation", action="store_true", help="skip the GX suites (benchmarks only)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints the manifest's row counts as JSON on success."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        ds = parse_ds(args.ds)
        overrides = json.loads(args.config_json) if args.config_json else {}
        if args.window_days:
            overrides.setdefault("features", {})["window_days"] = args.window_days
        cfg = load_config(overrides, args.config).features
    except (ConfigError, json.JSONDecodeError) as err:
        log.error("%s", err)
        return 2
    spark = spark_session("extract_features", args.master, cfg.shuffle_partitions, conf=session_conf(cfg), default_master=cfg.spark_master)
    spark.sparkContext.setLogLevel("WARN")
    try:
        manifest = run(spark, args.raw, args.out, ds, cfg, validate_data=not args.no_validation, allowed_root=args.allowed_root)
    except (RawWindowError, DataValidationError, OutsideDataRoot) as err:
        log.error("%s", err)
        return 1
    finally:
        spark.stop()
    print(json.dumps({"ds": manifest["ds"], "rows": {n: t["rows"] for n, t in manifest["tables"].items()}, "counts": manifest["counts"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
