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
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file by spark-submit: make `pipeline` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ConfigError, FeatureConfig, load_config, parse_ds  # noqa: E402
from pipeline.data.contract import EVENT_TYPES  # noqa: E402
from pipeline.io import publish_dir  # noqa: E402
from pipeline.validation import DataValidationError, feature_suites, raw_events_suite, validate  # noqa: E402

from pyspark.sql import DataFrame, SparkSession, Window  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402
from pyspark.sql import types as T  # noqa: E402

log = logging.getLogger("extract_features")

# Column name -> accepted Spark types: the raw contract as Spark sees it.
RAW_COLUMNS = {
    "event_id": (T.StringType,),
    "user_id": (T.StringType,),
    "item_id": (T.StringType,),
    "event_type": (T.StringType,),
    "event_ts": (T.TimestampType,),
    "value": (T.DoubleType, T.FloatType),
    "session_id": (T.StringType,),
}
QUARANTINE_REASONS = ("null_id", "unknown_event_type", "timestamp_outside_window", "invalid_value", "conflicting_event_id")


class RawDataError(ValueError):
    """The raw window cannot be processed (missing partitions, columns, types, corrupt files,
    or too many quarantined rows)."""


@dataclasses.dataclass(frozen=True)
class FeatureTables:
    """Everything the job writes, as DataFrames."""

    interactions: DataFrame
    user_features: DataFrame
    item_features: DataFrame
    user_vocab: DataFrame
    item_vocab: DataFrame

    def as_dict(self) -> dict[str, DataFrame]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# ----------------------------------------------------------------------------- transform


def check_raw_schema(events: DataFrame) -> DataFrame:
    """Check the raw contract's columns and types, and select exactly those columns.

    Raises:
        RawDataError: Naming every missing column and every column of the wrong type.
    """
    fields = {f.name: f.dataType for f in events.schema.fields}
    missing = [c for c in RAW_COLUMNS if c not in fields]
    wrong = [
        f"{c} is {fields[c].simpleString()}, expected {' or '.join(t().simpleString() for t in types)}"
        for c, types in RAW_COLUMNS.items()
        if c in fields and not isinstance(fields[c], types)
    ]
    problems = ([f"missing column(s) {missing}"] if missing else []) + wrong
    if problems:
        raise RawDataError("raw events break the contract: " + "; ".join(problems))
    return events.select(*[F.col(c).cast("double") if c == "value" else F.col(c) for c in RAW_COLUMNS])


def deduplicate_events(events: DataFrame) -> DataFrame:
    """Drop exact duplicates (same ``event_id`` and same content): at-least-once delivery."""
    # Hash-partitioning on event_id also satisfies the conflict window in flag_invalid_events,
    # so both steps share one shuffle.
    return events.repartition("event_id").dropDuplicates(list(RAW_COLUMNS))


def flag_invalid_events(events: DataFrame, window_start: dt.date, window_end: dt.date) -> DataFrame:
    """Add ``quarantine_reason`` (null for a valid row); the first failing rule wins.

    Rules in order: a null ``event_id``/``user_id``/``item_id``; an ``event_type`` outside
    the contract; an ``event_ts`` null or outside ``[window_start 00:00, window_end+1 00:00)``
    UTC; a negative or NaN ``value``; an ``event_id`` seen with conflicting content.
    Expects exact duplicates already removed.
    """
    # UTC-aware bounds: a naive datetime literal would be read in the driver's local time zone.
    start = dt.datetime.combine(window_start, dt.time.min, tzinfo=dt.timezone.utc)
    end = dt.datetime.combine(window_end + dt.timedelta(days=1), dt.time.min, tzinfo=dt.timezone.utc)
    copies = F.count(F.lit(1)).over(Window.partitionBy("event_id"))
    reason = (
        F.when(F.col("event_id").isNull() | F.col("user_id").isNull() | F.col("item_id").isNull(), "null_id")
        .when(F.col("event_type").isNull() | ~F.col("event_type").isin(*EVENT_TYPES), "unknown_event_type")
        .when(
            F.col("event_ts").isNull() | (F.col("event_ts") < F.lit(start)) | (F.col("event_ts") >= F.lit(end)),
            "timestamp_outside_window",
        )
        .when(F.isnan("value") | (F.col("value") < 0), "invalid_value")
        .when(copies > 1, "conflicting_event_id")
    )
    return events.withColumn("quarantine_reason", reason)


def build_interactions(events: DataFrame, cfg: FeatureConfig) -> DataFrame:
    """Aggregate valid events into one implicit-feedback interaction per (user, item).

    ``weight`` sums ``cfg.event_weights`` over the pair's events; ``first_ts`` is when the
    user first touched the item, which orders the chronological split.
    """
    weight = F.coalesce(*[F.when(F.col("event_type") == t, F.lit(w)) for t, w in sorted(cfg.event_weights.items())])
    return (
        events.repartition("user_id")  # one shuffle serves the pair aggregate and the per-user window
        .groupBy("user_id", "item_id")
        .agg(
            F.sum(weight).alias("weight"),
            F.count(F.lit(1)).cast("int").alias("n_events"),
            F.min("event_ts").alias("first_ts"),
            F.max("event_ts").alias("last_ts"),
        )
        .select("user_id", "item_id", "weight", "n_events", "first_ts", "last_ts")
    )


def split_interactions(interactions: DataFrame, cfg: FeatureConfig) -> DataFrame:
    """Split each user's interactions chronologically into train / validation / test.

    Rule: order a user's n interactions by ``(first_ts, item_id)``. Users with
    ``n < cfg.min_user_interactions`` stay train-only. Otherwise the latest
    ``max(1, floor(n * test_fraction))`` go to test, the ``max(1, floor(n * val_fraction))``
    before them to validation, the rest to train.
    """
    by_user = Window.partitionBy("user_id")
    latest_first = by_user.orderBy(F.col("first_ts").desc(), F.col("item_id").desc())
    n = F.count(F.lit(1)).over(by_user)
    n_test = F.greatest(F.lit(1), F.floor(n * cfg.test_fraction))
    n_val = F.greatest(F.lit(1), F.floor(n * cfg.val_fraction))
    rank = F.row_number().over(latest_first)
    split = (
        F.when(n < cfg.min_user_interactions, "train")
        .when(rank <= n_test, "test")
        .when(rank <= n_test + n_val, "validation")
        .otherwise("train")
    )
    return interactions.withColumn("split", split).select(*interactions.columns, "split")


def build_vocab(ids: DataFrame, column: str, index_column: str) -> DataFrame:
    """Stable vocabulary: distinct ids sorted, numbered from 1 (0 is kept for padding/unknown)."""
    # A global order means one partition; vocabularies are small next to events.
    numbered = Window.orderBy(column)
    return (
        ids.select(column).where(F.col(column).isNotNull()).distinct()
        .withColumn(index_column, F.row_number().over(numbered).cast("int"))
        .select(column, index_column)
    )


def build_user_features(events: DataFrame, interactions: DataFrame, users: DataFrame, user_vocab: DataFrame,
                        item_vocab: DataFrame, window_end: dt.date, cfg: FeatureConfig) -> DataFrame:
    """Per-user features from train interactions only, so no held-out event leaks into them.

    Columns: ids, event counts by type, ``n_train``/``n_validation``/``n_test``,
    ``recency_days`` (from the last train event to the end of the window), the last
    ``cfg.history_length`` train items (oldest first), and the profile's side features.
    """
    train = interactions.where(F.col("split") == "train").select("user_id", "item_id", "first_ts")
    train_events = events.join(train.select("user_id", "item_id"), on=["user_id", "item_id"], how="inner")
    end = dt.datetime.combine(window_end + dt.timedelta(days=1), dt.time.min, tzinfo=dt.timezone.utc)
    activity = train_events.groupBy("user_id").agg(
        *[F.sum((F.col("event_type") == t).cast("int")).alias(f"n_{t}") for t in EVENT_TYPES],
        ((F.lit(end).cast("double") - F.max("event_ts").cast("double")) / 86400.0).alias("recency_days"),
    )
    ordered = F.sort_array(F.collect_list(F.struct("first_ts", "item_id", "item_idx")))
    # slice() with a negative start returns [] for arrays shorter than N: start from max(1, size - N + 1).
    recent = F.slice(ordered, F.greatest(F.lit(1), F.size(ordered) - cfg.history_length + 1), cfg.history_length)
    history = (
        train.join(item_vocab, on="item_id", how="inner")
        .groupBy("user_id")
        .agg(recent.alias("recent"))
        .select("user_id", F.col("recent.item_id").alias("history_item_ids"), F.col("recent.item_idx").alias("history_item_idx"))
    )
    counts = interactions.groupBy("user_id").agg(
        *[F.sum((F.col("split") == s).cast("int")).alias(f"n_{s}") for s in ("train", "validation", "test")]
    )
    return (
        user_vocab.join(counts, on="user_id", how="inner")
        .join(activity, on="user_id", how="left")
        .join(history, on="user_id", how="left")
        .join(users, on="user_id", how="left")
        .select(
            "user_id", "user_idx", "n_train", "n_validation", "n_test",
            *[F.coalesce(F.col(f"n_{t}"), F.lit(0)).cast("int").alias(f"n_{t}") for t in EVENT_TYPES],
            "recency_days", "history_item_ids", "history_item_idx", "age", "gender", "occupation",
        )
    )


def build_item_features(interactions: DataFrame, items: DataFrame, item_vocab: DataFrame) -> DataFrame:
    """Per-item features from train interactions plus catalogue side features.

    ``popularity`` is the number of train interactions (distinct users, as interactions are
    unique per pair); ``weighted_popularity`` sums their weights; items never seen in
    train get zeros.
    """
    train = interactions.where(F.col("split") == "train")
    stats = train.groupBy("item_id").agg(
        F.count(F.lit(1)).cast("int").alias("popularity"),
        F.sum("weight").alias("weighted_popularity"),
        F.sum("n_events").cast("int").alias("n_events"),
    )
    return (
        item_vocab.join(stats, on="item_id", how="left")
        .join(items, on="item_id", how="left")
        .select(
            "item_id", "item_idx",
            F.coalesce("popularity", F.lit(0)).alias("popularity"),
            F.coalesce("weighted_popularity", F.lit(0.0)).alias("weighted_popularity"),
            F.coalesce("n_events", F.lit(0)).alias("n_events"),
            "year", "categories",
        )
    )


def transform(events: DataFrame, items: DataFrame, users: DataFrame, window_end: dt.date, cfg: FeatureConfig) -> FeatureTables:
    """Valid events plus catalogue and profiles -> every feature table.

    Args:
        events: Valid, deduplicated events (contract columns).
        items: Item catalogue (``item_id``, ``year``, ``categories``).
        users: User profiles (``user_id``, ``age``, ``gender``, ``occupation``).
        window_end: Last day of the window (recency is measured to its end).
        cfg: Feature settings.

    Returns:
        The feature tables.
    """
    items = items.select("item_id", "year", "categories")
    users = users.select("user_id", "age", "gender", "occupation")
    # Every output table derives from these three; caching them keeps each computed once.
    split = split_interactions(build_interactions(events, cfg), cfg).cache()
    user_vocab = build_vocab(split, "user_id", "user_idx").cache()
    item_vocab = build_vocab(split.select("item_id").unionByName(items.select("item_id")), "item_id", "item_idx").cache()
    interactions = (
        split.join(user_vocab, on="user_id", how="inner")
        .join(item_vocab, on="item_id", how="inner")
        .select("user_id", "item_id", "user_idx", "item_idx", "weight", "n_events", "first_ts", "last_ts", "split")
        .cache()
    )
    return FeatureTables(
        interactions=interactions,
        user_features=build_user_features(events, interactions, users, user_vocab, item_vocab, window_end, cfg),
        item_features=build_item_features(interactions, items, item_vocab),
        user_vocab=user_vocab,
        item_vocab=item_vocab,
    )


# ----------------------------------------------------------------------------- extract / load


def window_partitions(events_root: Path, window_start: dt.date, window_end: dt.date) -> list[Path]:
    """The existing ``ds=`` partition directories inside the window, oldest first."""
    days = (window_end - window_start).days + 1
    wanted = [events_root / f"ds={window_start + dt.timedelta(days=i)}" for i in range(days)]
    return [p for p in wanted if p.is_dir()]


def read_raw(spark: SparkSession, raw_root: Path, window_start: dt.date, window_end: dt.date) -> tuple[DataFrame, DataFrame, DataFrame, list[Path]]:
    """Read the window's event partitions (only those), the catalogue and the profiles.

    Raises:
        RawDataError: No partition in the window, or a file Spark cannot read.
    """
    partitions = window_partitions(raw_root / "events", window_start, window_end)
    if not partitions:
        raise RawDataError(f"empty window: no event partitions ds={window_start}..ds={window_end} under {raw_root / 'events'}")
    try:
        events = spark.read.parquet(*[str(p) for p in partitions])
        items = _read_side_table(spark, raw_root / "items", "item_id", T.StructType([
            T.StructField("item_id", T.StringType()), T.StructField("year", T.IntegerType()),
            T.StructField("categories", T.ArrayType(T.StringType()))]))
        users = _read_side_table(spark, raw_root / "users", "user_id", T.StructType([
            T.StructField("user_id", T.StringType()), T.StructField("age", T.IntegerType()),
            T.StructField("gender", T.StringType()), T.StructField("occupation", T.StringType())]))
    except Exception as err:  # noqa: BLE001 - Spark raises many kinds; name the input instead
        raise RawDataError(f"cannot read raw data under {raw_root}: {_first_line(err)}") from err
    return check_raw_schema(events), items, users, partitions


def _read_side_table(spark: SparkSession, path: Path, key: str, schema: T.StructType) -> DataFrame:
    if not path.exists():
        log.warning("no %s table at %s; side features will be null", path.name, path)
        return spark.createDataFrame([], schema)
    table = spark.read.parquet(str(path))
    missing = [f.name for f in schema.fields if f.name not in table.columns]
    if missing:
        raise RawDataError(f"{path.name} table at {path} lacks column(s) {missing}")
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


def spark_session(master: str | None, cfg: FeatureConfig) -> SparkSession:
    """The job's session; under spark-submit the master comes from spark-submit."""
    builder = (
        SparkSession.builder.appName("extract_features")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
        .config("spark.ui.showConsoleProgress", "false")
    )
    if master or "PYSPARK_GATEWAY_PORT" not in os.environ:  # not launched by spark-submit
        builder = builder.master(master or cfg.spark_master)
    return builder.getOrCreate()


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
        RawDataError: Structural faults or too many quarantined rows.
        DataValidationError: A GX suite failed.
    """
    started = time.perf_counter()
    raw_root, out_root = Path(raw_root), Path(out_root)
    window_start, window_end = cfg.window(ds)
    docs_root = out_root / "_validation" / f"ds={ds}"
    shutil.rmtree(docs_root, ignore_errors=True)  # the docs describe this run only
    events, items, users, partitions = read_raw(spark, raw_root, window_start, window_end)
    log.info("read %d partition(s) ds=%s..ds=%s", len(partitions), window_start, window_end)

    try:
        raw_count = events.count()
        deduped = deduplicate_events(events).cache()
        deduped_count = deduped.count()
    except Exception as err:  # noqa: BLE001 - e.g. a corrupt Parquet file surfaces only here
        raise RawDataError(f"cannot read raw events under {raw_root / 'events'}: {_first_line(err)}") from err
    if deduped_count < cfg.min_events:
        raise RawDataError(f"empty window: {deduped_count} event(s) in ds={window_start}..ds={window_end}, need >= {cfg.min_events}")
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
        raise RawDataError(
            f"quarantined share {share:.2%} ({quarantined} of {deduped_count} events: {dict(sorted(by_reason.items()))}) exceeds "
            f"features.max_quarantine_share={cfg.max_quarantine_share:.2%}; rows written to {rejected}"
        )
    valid = flagged.where(F.col("quarantine_reason").isNull()).drop("quarantine_reason")
    tables = transform(valid, items, users, window_end, cfg)

    out_root.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_root / f".tmp-ds={ds}-{uuid.uuid4().hex[:8]}"
    try:
        schemas = write_tables({**tables.as_dict(), "quarantine": flagged.where(F.col("quarantine_reason").isNotNull())}, tmp_dir, cfg.shuffle_partitions)
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
                "interactions_by_split": {s: split_counts.get(s, 0) for s in ("train", "validation", "test")},
            },
            "tables": {name: {"rows": written[name].count(), **schemas[name]} for name in schemas},
            "validation": checks,
            "config": dataclasses.asdict(cfg),
            "spark_version": spark.version,
        }
        (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        publish_dir(tmp_dir, out_root / f"ds={ds}")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        spark.catalog.clearCache()
    log.info("wrote %s in %.1fs: %s", out_root / f"ds={ds}", time.perf_counter() - started,
             {n: t["rows"] for n, t in manifest["tables"].items()})
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
    spark = spark_session(args.master, cfg)
    spark.sparkContext.setLogLevel("WARN")
    try:
        manifest = run(spark, args.raw, args.out, ds, cfg, validate_data=not args.no_validation)
    except (RawDataError, DataValidationError) as err:
        log.error("%s", err)
        return 1
    finally:
        spark.stop()
    print(json.dumps({"ds": manifest["ds"], "rows": {n: t["rows"] for n, t in manifest["tables"].items()}, "counts": manifest["counts"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
