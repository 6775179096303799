"""Feature extraction over one window of raw user-behaviour logs.

Runs the same way under ``spark-submit spark_jobs/extract_features.py ...`` (any master,
set by spark-submit) and ``python -m spark_jobs.extract_features ...`` (own session,
``--master`` or the config's ``features.spark_master``). Only :func:`main` knows paths:
extract (read the window) -> transform (pure DataFrame functions) -> load (atomic write).

Output, under ``<out>/ds=<ds>/`` (renamed into place only after every check passed)::

    interactions/split=<train|validation|test>/   one row per (user, item)
    user_features/  item_features/  user_vocab/  item_vocab/
    quarantine/                                   invalid rows, with the reason
    manifest.json                                 counts, schemas, inputs, config

GX Data Docs go to ``<out>/_validation/ds=<ds>/`` whether the run passes or fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
from typing import Sequence

if __package__ in (None, ""):  # run as a file by spark-submit: make `pipeline` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.catalog import date_partition, validation_docs  # noqa: E402
from pipeline.config import ConfigError, FeatureConfig, load_config, parse_ds  # noqa: E402
from pipeline.data.contract import ITEM_SCHEMA, USER_SCHEMA, RawWindowError, window_partitions  # noqa: E402
from pipeline.features import SPLITS  # noqa: E402
from pipeline.io import atomic_dir  # noqa: E402
from pipeline.spark import spark_session  # noqa: E402
from pipeline.validation import DataValidationError, feature_suites, raw_events_suite, validate  # noqa: E402
from spark_jobs.feature_transforms import check_raw_schema, deduplicate_events, flag_invalid_events, transform  # noqa: E402

from pyspark.sql import DataFrame, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402
from pyspark.sql.pandas.types import from_arrow_schema  # noqa: E402

log = logging.getLogger("extract_features")


def read_raw(spark: SparkSession, raw_root: Path, window_start: dt.date, window_end: dt.date) -> tuple[DataFrame, DataFrame, DataFrame, list[Path]]:
    """Read the window's event partitions (only those), the catalogue and the profiles.

    Raises:
        RawWindowError: No partition in the window, or a file Spark cannot read.
    """
    partitions = window_partitions(raw_root, window_start, window_end)
    try:
        events = spark.read.parquet(*[str(p) for p in partitions])
        items = _read_side_table(spark, raw_root / "items", ITEM_SCHEMA)
        users = _read_side_table(spark, raw_root / "users", USER_SCHEMA)
    except Exception as err:  # noqa: BLE001 - Spark raises many kinds; name the input instead
        raise RawWindowError(f"cannot read raw data under {raw_root}: {_first_line(err)}") from err
    return check_raw_schema(events), items, users, partitions


def _read_side_table(spark: SparkSession, path: Path, contract: pa.Schema) -> DataFrame:
    """A side table cast to its contract schema, one row per key (its first column)."""
    schema, key = from_arrow_schema(contract), contract.names[0]
    if not path.exists():
        log.warning("no %s table at %s; side features will be null", path.name, path)
        return spark.createDataFrame([], schema)
    table = spark.read.parquet(str(path))
    missing = [f.name for f in schema.fields if f.name not in table.columns]
    if missing:
        raise RawWindowError(f"{path.name} table at {path} lacks column(s) {missing}")
    return table.select(*[F.col(f.name).cast(f.dataType) for f in schema.fields]).dropDuplicates([key])


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return next((line for line in text if line.strip()), type(err).__name__)[:500]


def write_tables(tables: dict[str, DataFrame], directory: Path, files: int) -> dict[str, dict]:
    """Write each table as Parquet, rows sorted so that a re-run writes the same content.

    Returns:
        Table name -> ``{"rows", "schema"}`` for the manifest.
    """
    # Interactions go in a hashed (pseudo-random but fixed) order so that a trainer's streaming
    # shuffle buffer sees many users at once; the other tables are sorted by their key.
    keys = {"interactions": [F.xxhash64("user_idx", "item_idx"), "user_idx", "item_idx"], "user_features": ["user_idx"],
            "item_features": ["item_idx"], "user_vocab": ["user_idx"], "item_vocab": ["item_idx"], "quarantine": ["event_id", "event_ts"]}
    written = {}
    for name, frame in tables.items():
        by = ["user_idx", "item_idx"] if name == "interactions" else keys[name]
        writer = frame.repartition(files if name == "interactions" else 1, *by).sortWithinPartitions(*keys[name]).write
        if name == "interactions":
            writer = writer.partitionBy("split")
        writer.mode("error").parquet(str(directory / name))
        written[name] = {"schema": [[f.name, f.dataType.simpleString()] for f in frame.schema.fields]}
    return written


def run(spark: SparkSession, raw_root: str | Path, out_root: str | Path, ds: dt.date, cfg: FeatureConfig,
        validate_data: bool = True) -> dict:
    """Extract, check, transform and publish one ``ds``.

    Args:
        spark: The session to use.
        raw_root: Raw root (``events/``, ``items/``, ``users/``).
        out_root: Feature root; the result lands in ``<out_root>/ds=<ds>/``.
        ds: Logical date; the window ends on it.
        cfg: Feature settings.
        validate_data: Run the GX suites (the benchmark turns this off to time the transform alone).

    Returns:
        The manifest (also written as ``manifest.json``).

    Raises:
        RawWindowError: Structural faults or too many quarantined rows.
        DataValidationError: A GX suite failed.
    """
    started = time.perf_counter()
    raw_root, out_root = Path(raw_root), Path(out_root)
    window_start, window_end = cfg.window(ds)
    final_dir, docs_root = date_partition(out_root, ds.isoformat()), validation_docs(out_root, ds.isoformat())
    shutil.rmtree(docs_root, ignore_errors=True)  # the docs describe this run only
    events, items, users, partitions = read_raw(spark, raw_root, window_start, window_end)
    log.info("read %d partition(s) ds=%s..ds=%s", len(partitions), window_start, window_end)

    try:
        raw_count = events.count()
        deduped = deduplicate_events(events).cache()
        deduped_count = deduped.count()
    except Exception as err:  # noqa: BLE001 - e.g. a corrupt Parquet file surfaces only here
        raise RawWindowError(f"cannot read raw events under {raw_root / 'events'}: {_first_line(err)}") from err
    if deduped_count < cfg.min_events:
        raise RawWindowError(f"empty window: {deduped_count} event(s) in ds={window_start}..ds={window_end}, need >= {cfg.min_events}")
    log.info("events: %d raw, %d exact duplicates removed", raw_count, raw_count - deduped_count)
    checks: dict[str, dict] = {}
    if validate_data:
        checks["raw"] = validate({"raw_events": deduped}, {"raw_events": raw_events_suite(window_start, window_end, cfg)}, docs_root / "raw")

    flagged = flag_invalid_events(deduped, window_start, window_end).cache()
    by_reason = {r["quarantine_reason"]: r["count"] for r in flagged.where(F.col("quarantine_reason").isNotNull()).groupBy("quarantine_reason").count().collect()}
    quarantined = sum(by_reason.values())
    share = quarantined / deduped_count
    log.info("quarantined %d of %d events (%.3f%%): %s", quarantined, deduped_count, 100 * share, by_reason or "none")
    if share > cfg.max_quarantine_share:
        rejected = docs_root / "quarantine"  # kept for inspection; no feature output is written
        flagged.where(F.col("quarantine_reason").isNotNull()).write.mode("overwrite").parquet(str(rejected))
        raise RawWindowError(
            f"quarantined share {share:.2%} ({quarantined} of {deduped_count} events: {dict(sorted(by_reason.items()))}) exceeds "
            f"features.max_quarantine_share={cfg.max_quarantine_share:.2%}; rows written to {rejected}"
        )
    valid = flagged.where(F.col("quarantine_reason").isNull()).drop("quarantine_reason")
    tables = transform(valid, items, users, window_end, cfg)

    try:
        with atomic_dir(final_dir) as tmp_dir:
            schemas = write_tables({**tables.as_dict(), "quarantine": flagged.where(F.col("quarantine_reason").isNotNull())},
                                   tmp_dir, cfg.shuffle_partitions)
            written = {name: spark.read.parquet(str(tmp_dir / name)) for name in schemas}
            if validate_data:
                checks["features"] = validate({n: written[n] for n in tables.as_dict()}, feature_suites(), docs_root / "features")
            split_counts = {r["split"]: r["count"] for r in written["interactions"].groupBy("split").count().collect()}
            manifest = {
                "ds": ds.isoformat(),
                "window": {"start": window_start.isoformat(), "end": window_end.isoformat()},
                "input_partitions": [p.name for p in partitions],
                "counts": {
                    "raw_events": raw_count,
                    "exact_duplicates": raw_count - deduped_count,
                    "quarantined": quarantined,
                    "quarantined_by_reason": dict(sorted(by_reason.items())),
                    "valid_events": deduped_count - quarantined,
                    "interactions_by_split": {s: split_counts.get(s, 0) for s in SPLITS},
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True, help="raw root with events/, items/, users/")
    parser.add_argument("--out", required=True, help="feature root; writes <out>/ds=<ds>/")
    parser.add_argument("--ds", required=True, help="logical date YYYY-MM-DD (the window's last day)")
    parser.add_argument("--config", help="pipeline config JSON file")
    parser.add_argument("--config-json", help="nested settings as a JSON string, applied after --config")
    parser.add_argument("--window-days", type=int, help="override features.window_days")
    parser.add_argument("--master", help="Spark master when not run by spark-submit (default: config)")
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
    spark = spark_session("extract_features", args.master, cfg.shuffle_partitions, default_master=cfg.spark_master)
    spark.sparkContext.setLogLevel("WARN")
    try:
        manifest = run(spark, args.raw, args.out, ds, cfg, validate_data=not args.no_validation)
    except (RawWindowError, DataValidationError) as err:
        log.error("%s", err)
        return 1
    finally:
        spark.stop()
    print(json.dumps({"ds": manifest["ds"], "rows": {n: t["rows"] for n, t in manifest["tables"].items()}, "counts": manifest["counts"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
