"""Feature extraction over one window of raw user-behaviour logs.

Runs the same way under ``spark-submit spark_jobs/extract_features.py ...`` (any master,
set by spark-submit) and ``python -m spark_jobs.extract_features ...`` (own session,
``--master`` or the config's ``features.spark_master``). :func:`run` is four steps:
:func:`extract` (read the window: :mod:`spark_jobs.raw_inputs`) -> :func:`clean` (exact
duplicates, the quarantine rules of :mod:`spark_jobs.event_rules` and their limit, the raw
GX suite) -> ``transform`` (:mod:`spark_jobs.feature_transforms`, DataFrames in and out)
-> :func:`load` (atomic write, the feature GX suites, the manifest). Paths come from the
caller (:func:`main` takes them from ``--out``, or from the catalogue for ``--data-root``)
and reach only the steps that read or write files; ``transform`` sees DataFrames alone.

Output, under ``<out>/ds=<ds>/`` (renamed into place only after every check passed)::

    interactions/split=<train|validation|test>/   one row per (user, item); user_features/ item_features/ user_vocab/ item_vocab/
    quarantine/                                   invalid rows, with the reason
    manifest.json                                 counts, schemas, input files, config

GX Data Docs go to ``<out>/_validation/ds=<ds>/`` whether the run passes or fails. With
``--data-root DIR``, ``<out>`` is ``Catalog(DIR).for_run(ds, cfg).features_home``.
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
from typing import NamedTuple, Sequence

from pyspark import SparkContext
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline.catalog import Catalog, OutsideDataRoot, confine, date_partition, validation_docs
from pipeline.config import ConfigError, FeatureConfig, PipelineConfig, load_config, parse_ds
from pipeline.data.contract import RawWindowError
from pipeline.data.features import SPLITS
from pipeline.io import atomic_dir
from pipeline.records import FeatureManifest
from pipeline.spark import spark_session
from spark_jobs.cleaning import CleanEvents, clean
from spark_jobs.feature_transforms import FeatureTables, transform
from spark_jobs.raw_inputs import RawInputs, read_raw, spark_stage
from spark_jobs.validation import DataValidationError, feature_suites, validate, with_pair_key

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


class Outputs(NamedTuple):
    """Where the job writes one ``ds``."""

    partition: Path  # <out>/ds=<ds>: the feature set, published whole or not at all
    docs: Path  # <out>/_validation/ds=<ds>: GX Data Docs, and the rows of a window rejected for its quarantine


def prepare_outputs(out_root: str | Path, ds: dt.date, allowed_root: str | Path | None = None) -> Outputs:
    """The output directories of ``ds``, once they resolve inside ``allowed_root`` (default:
    ``out_root``), with an earlier run's Data Docs removed (the docs describe this run only)."""
    outputs = Outputs(date_partition(out_root, ds.isoformat()), validation_docs(out_root, ds.isoformat()))
    for path in outputs:
        confine(path, allowed_root or out_root)
    shutil.rmtree(outputs.docs, ignore_errors=True)
    return outputs


def extract(spark: SparkSession, raw_root: str | Path, ds: dt.date, cfg: FeatureConfig,
            allowed_root: str | Path | None = None) -> RawInputs:
    """Read the raw window ending at ``ds`` (see :func:`~spark_jobs.raw_inputs.read_raw`) and set
    the session's partitioning for it.

    Raises:
        RawWindowError: Structural faults of the window.
        OutsideDataRoot: An input resolves outside ``allowed_root`` (default: ``raw_root``).
    """
    inputs = read_raw(spark, Path(raw_root), *cfg.window(ds), allowed_root)
    if spark.conf.get(MIN_SPLITS_CONF, None) is None:
        # At least two input splits per core: Spark's default (one per core, capped at 128 MB)
        # gave 3 splits of the 10M-event window to 2 cores, one core idle for a third of the read
        # (Spark sizes the splits when the scan runs, after every path was checked).
        spark.conf.set(MIN_SPLITS_CONF, str(2 * spark.sparkContext.defaultParallelism))
    # The interactions are stored partition by partition, so their order (the order a trainer
    # reads them in, and so the trained weights) follows the shuffle partitions: those of the
    # settings the manifest records, not those of whatever session the caller passed.
    spark.conf.set(SHUFFLE_PARTITIONS_CONF, str(cfg.shuffle_partitions))
    log.info("read %d partition(s), %s", len(inputs.partitions), inputs.where)
    return inputs


def load(spark: SparkSession, tables: FeatureTables, inputs: RawInputs, events: CleanEvents, outputs: Outputs,
         ds: dt.date, cfg: FeatureConfig, validate_data: bool = True) -> dict:
    """Write the feature tables and the quarantine, run the feature GX suites on what was written,
    and publish it with its manifest as ``outputs.partition`` in one rename.

    Returns:
        The manifest (:func:`build_manifest`).

    Raises:
        RawWindowError: A Spark failure while building the tables.
        DataValidationError: A feature GX suite failed (nothing is published).
    """
    with spark_stage("building the feature tables", inputs.where), atomic_dir(outputs.partition) as tmp_dir:
        schemas, split_counts = write_tables({**tables.as_dict(), "quarantine": events.quarantine}, tmp_dir)
        written = {name: spark.read.parquet(str(tmp_dir / name)) for name in schemas}
        checks = dict(events.checks)
        if validate_data:
            frames = {n: with_pair_key(written[n]) if n == "interactions" else written[n] for n in tables.as_dict()}
            checks["features"] = validate(frames, feature_suites(), outputs.docs / "features")
        over_cap = tables.over_cap.first().asDict()
        if over_cap["users"]:
            log.warning("%d user(s) over features.max_user_interactions=%d: %d oldest interaction(s) dropped",
                        over_cap["users"], cfg.max_user_interactions, over_cap["interactions"])
        table_info = {name: {"rows": written[name].count(), **schema} for name, schema in schemas.items()}
        manifest = build_manifest(ds, cfg, inputs, events, split_counts, over_cap, table_info, checks, spark.version)
        FeatureManifest.from_dict(manifest).save(tmp_dir)
    return manifest


def build_manifest(ds: dt.date, cfg: FeatureConfig, inputs: RawInputs, events: CleanEvents, split_counts: dict[str, int],
                   over_cap: dict[str, int], tables: dict[str, dict], checks: dict[str, dict], spark_version: str) -> dict:
    """What ``manifest.json`` records: the window and its input files, the counts of every
    stage, each table's rows and schema, the GX results, the settings and the Spark version."""
    quarantined = sum(events.by_reason.values())
    return {
        "ds": ds.isoformat(),
        "window": {"start": inputs.window_start.isoformat(), "end": inputs.window_end.isoformat()},
        "input_partitions": [p.name for p in inputs.partitions],
        "input_files": [f.path.relative_to(inputs.events_dir).as_posix() for f in inputs.files],
        "counts": {
            "raw_events": events.raw_count,
            "exact_duplicates": events.raw_count - events.distinct_count,
            "duplicate_item_ids": inputs.duplicate_ids["items"],
            "duplicate_user_ids": inputs.duplicate_ids["users"],
            "quarantined": quarantined,
            "quarantined_by_reason": dict(sorted(events.by_reason.items())),
            "valid_events": events.distinct_count - quarantined,
            "interactions_by_split": {s: split_counts.get(s, 0) for s in SPLITS},
            "users_over_cap": over_cap["users"], "interactions_over_cap": over_cap["interactions"],
        },
        "tables": tables,
        "validation": checks,
        "config": dataclasses.asdict(cfg),
        "spark_version": spark_version,
    }


def run(spark: SparkSession, raw_root: str | Path, out_root: str | Path, ds: dt.date, cfg: FeatureConfig,
        validate_data: bool = True, allowed_root: str | Path | None = None) -> dict:
    """Extract, clean, transform and load one ``ds``.

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
    outputs = prepare_outputs(out_root, ds, allowed_root)
    inputs = extract(spark, raw_root, ds, cfg, allowed_root)
    try:
        events = clean(inputs, cfg, outputs.docs, validate_data)
        tables = transform(events.valid, inputs.items, inputs.users, inputs.window_end, cfg)
        manifest = load(spark, tables, inputs, events, outputs, ds, cfg, validate_data)
    finally:
        spark.catalog.clearCache()  # the run's caches, whether it published or failed
    log.info("wrote %s in %.1fs: %s", outputs.partition, time.perf_counter() - started, {n: t["rows"] for n, t in manifest["tables"].items()})
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
    parser.add_argument("--raw", help="raw root with events/, items/, users/ (default with --data-root: DIR/raw)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="feature root; writes <out>/ds=<ds>/")
    target.add_argument("--data-root", metavar="DIR", help="the pipeline's data root: writes where its later steps look for "
                        "this run's features, Catalog(DIR).for_run(ds, config).features_home (its version hashes DIR/raw)")
    parser.add_argument("--ds", required=True, help="logical date YYYY-MM-DD (the window's last day)")
    parser.add_argument("--config", help="pipeline config JSON file")
    parser.add_argument("--config-json", help="nested settings as a JSON string, applied after --config")
    parser.add_argument("--window-days", type=int, help="override features.window_days")
    parser.add_argument("--master", help="Spark master when not run by spark-submit (default: config)")
    parser.add_argument("--allowed-root", help="every path must resolve inside it, symlinks followed "
                        "(default: --raw for inputs, --out for outputs; with --data-root, DIR)")
    parser.add_argument("--no-validation", action="store_true", help="skip the GX suites (benchmarks only)")
    args = parser.parse_args(argv)
    if args.out is not None and args.raw is None:
        parser.error("--raw is required with --out")
    return args


def job_paths(args: argparse.Namespace, ds: dt.date, config: PipelineConfig) -> tuple[Path, Path, str | Path | None]:
    """``(raw root, feature root, allowed root)`` of the arguments: ``--out`` as given, or for
    ``--data-root`` the feature home the catalogue names for this run's ``ds`` and settings.

    Raises:
        OutsideDataRoot: A catalogue path resolves outside the allowed root.
    """
    if args.data_root is None:
        return Path(args.raw), Path(args.out), args.allowed_root
    catalog = Catalog(Path(args.data_root), allowed=args.allowed_root).for_run(ds.isoformat(), config)
    return Path(args.raw) if args.raw else catalog.raw, catalog.features_home, catalog.allowed


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints the manifest's row counts as JSON on success."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        ds = parse_ds(args.ds)
        overrides = json.loads(args.config_json) if args.config_json else {}
        if args.window_days:
            overrides.setdefault("features", {})["window_days"] = args.window_days
        config = load_config(overrides, args.config)
        raw_root, out_root, allowed_root = job_paths(args, ds, config)
    except (ConfigError, json.JSONDecodeError) as err:
        log.error("%s", err)
        return 2
    except OutsideDataRoot as err:
        log.error("%s", err)
        return 1
    cfg = config.features
    started_here = SparkContext._active_spark_context is None  # a session the caller already runs stays running
    spark = spark_session("extract_features", args.master, cfg.shuffle_partitions, conf=session_conf(cfg), default_master=cfg.spark_master)
    spark.sparkContext.setLogLevel("WARN")
    try:
        manifest = run(spark, raw_root, out_root, ds, cfg, validate_data=not args.no_validation, allowed_root=allowed_root)
    except (RawWindowError, DataValidationError, OutsideDataRoot) as err:
        log.error("%s", err)
        return 1
    finally:
        if started_here:
            spark.stop()
    print(json.dumps({"ds": manifest["ds"], "rows": {n: t["rows"] for n, t in manifest["tables"].items()}, "counts": manifest["counts"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
