"""Pure DataFrame transforms of the feature job: raw events in, feature tables out.

Each function takes DataFrames and settings and returns a DataFrame; none reads or writes
files (only ``spark_jobs/extract_features.py`` knows paths). The rules a raw row must
follow come from :mod:`pipeline.data.contract`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import pyarrow as pa

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_type

from pipeline.config import FeatureConfig
from pipeline.data.contract import EVENT_ID_COPIES, EVENT_SCHEMA, EVENT_TYPES, ID_COLUMNS, MIN_VALUE, WHITESPACE, RawWindowError, window_bounds
from pipeline.data.raw_files import schema_problems
from pipeline.features import SPLITS

RAW_COLUMNS = tuple(EVENT_SCHEMA.names)
BROADCAST_CONFLICTS_MAX = 1_000_000  # conflicting event_ids sent to every task at most (a few tens of MB)


TABLES = ("interactions", "user_features", "item_features", "user_vocab", "item_vocab")


@dataclasses.dataclass(frozen=True)
class FeatureTables:
    """Everything the job writes, as DataFrames, and what the per-user cap left out."""

    interactions: DataFrame
    user_features: DataFrame
    item_features: DataFrame
    user_vocab: DataFrame
    item_vocab: DataFrame
    over_cap: DataFrame  # one row: users beyond features.max_user_interactions, interactions dropped; not written

    def as_dict(self) -> dict[str, DataFrame]:
        """The tables to write, by name."""
        return {name: getattr(self, name) for name in TABLES}


def events_from_storage(events: DataFrame, nanosecond_ts: bool) -> DataFrame:
    """Events read from files that store ``event_ts`` one way, with ``event_ts`` as a timestamp.

    Args:
        events: The contract's columns as read (an all-null column may be of null type).
        nanosecond_ts: ``event_ts`` was read as integer nanoseconds since the epoch (Spark
            cannot read Parquet's nanosecond timestamps as timestamps).

    Returns:
        The contract's columns with the contract's types (a null-typed column becomes a null
        column of its type); ``event_ts`` floored to microseconds, Spark's precision.
    """
    event_ts = F.col("event_ts")
    if nanosecond_ts:
        # Integer floor division: a double would lose nanoseconds, `div` alone rounds towards zero before 1970.
        event_ts = F.timestamp_micros(F.expr("(event_ts - pmod(event_ts, 1000)) div 1000"))
    return events.select(*[(event_ts if f.name == "event_ts" else F.col(f.name)).cast(from_arrow_type(f.type)).alias(f.name) for f in EVENT_SCHEMA])


def keep_last_per_key(table: DataFrame, key: str) -> DataFrame:
    """One row per ``key`` in a side table: the last one read.

    Rule: files in name order, rows in file order; a later row replaces an earlier one, as
    an update sent after the original would. Deterministic whatever Spark's partitioning.

    Args:
        table: The side table with ``_source_file`` (file name) and ``_source_row`` (row
            index in that file), e.g. from Spark's ``_metadata`` column.
        key: The key column.

    Returns:
        ``table`` without the two source columns, one row per key.
    """
    latest_first = Window.partitionBy(key).orderBy(F.col("_source_file").desc(), F.col("_source_row").desc())
    return (
        table.withColumn("_rank", F.row_number().over(latest_first))
        .where(F.col("_rank") == 1)
        .select(*[c for c in table.columns if c not in ("_source_file", "_source_row")])
    )


def check_raw_schema(events: DataFrame) -> DataFrame:
    """Check the raw contract's columns and types, and select exactly those columns.

    Spark's schema is turned into Arrow types and judged by the same rule as the
    pre-flight check (:func:`pipeline.data.raw_files.schema_problems`).

    Raises:
        RawWindowError: Naming every missing column and every column of the wrong type.
    """
    from pyspark.sql.pandas.types import to_arrow_type

    fields = []
    for field in events.schema.fields:
        try:
            fields.append(pa.field(field.name, to_arrow_type(field.dataType, timezone="UTC")))
        except (TypeError, AssertionError, NotImplementedError):  # a type Arrow has no match for
            fields.append(pa.field(field.name, pa.null()))
    problems = schema_problems(pa.schema(fields))
    if problems:
        raise RawWindowError("raw events break the contract: " + "; ".join(problems))
    return events.select(*[F.col(c).cast("double") if c == "value" else F.col(c) for c in RAW_COLUMNS])


def deduplicate_events(events: DataFrame) -> DataFrame:
    """Drop exact duplicates (same ``event_id`` and same content): at-least-once delivery.

    The result is hash-partitioned on ``event_id``, which :func:`conflicting_event_ids`
    and :func:`with_event_id_copies` need: cached, it serves both with no further shuffle.
    """
    return events.repartition("event_id").dropDuplicates(list(RAW_COLUMNS))


def flag_invalid_events(events: DataFrame, window_start: dt.date, window_end: dt.date) -> DataFrame:
    """Add ``quarantine_reason`` by the row rules (null for a valid row); the first failing rule wins.

    The rules and their order are :data:`pipeline.data.contract.QUARANTINE_REASONS`; all
    but the last, ``conflicting_event_id``, which needs every copy of an ``event_id`` and is
    applied by :func:`with_event_id_copies`. The feature job flags the distinct events once,
    as it caches them: the string rules cost more than a scan of the cache.

    Args:
        events: Distinct events (contract columns).
        window_start: First day of the window (inclusive).
        window_end: Last day of the window (inclusive).
    """
    start, end = window_bounds(window_start, window_end)
    null_id, blank_id = F.lit(False), F.lit(False)
    for column in ID_COLUMNS:
        null_id = null_id | F.col(column).isNull()
        blank_id = blank_id | _blank(F.col(column))
    reason = (
        F.when(null_id, "null_id")
        .when(blank_id, "blank_id")
        .when(F.col("event_type").isNull() | ~F.col("event_type").isin(*EVENT_TYPES), "unknown_event_type")
        .when(
            F.col("event_ts").isNull() | (F.col("event_ts") < F.lit(start)) | (F.col("event_ts") >= F.lit(end)),
            "timestamp_outside_window",
        )
        .when(F.isnan("value") | F.col("value").isin(float("inf"), float("-inf")), "non_finite_value")
        .when(F.col("value") < MIN_VALUE, "invalid_value")
    )
    return events.select(*RAW_COLUMNS, reason.alias("quarantine_reason"))


def _blank(value: Column) -> Column:
    """``value`` is empty or only :data:`~pipeline.data.contract.WHITESPACE` (null for null)."""
    # Only a value that starts with whitespace can be blank, so the trim (costly with a set of
    # characters) runs on those alone: the rule on three ids took 6 s at 10M events, 2.4 s so.
    starts_blank = F.substring(value, 1, 1).isin(*WHITESPACE)
    return F.when((value != "") & ~starts_blank, F.lit(False)).otherwise(F.btrim(value, F.lit(WHITESPACE)) == "")


def conflicting_event_ids(distinct: DataFrame) -> DataFrame:
    """``event_id`` and ``event_id_copies`` of every id shared by more than one distinct event.

    A hash aggregate on :func:`deduplicate_events`' partitioning: no shuffle and no sort (a
    window over ``event_id`` would sort every event). Null ids are left out: they are
    quarantined as ``null_id`` and never conflict.
    """
    return (
        distinct.groupBy("event_id").agg(F.count(F.lit(1)).cast("int").alias(EVENT_ID_COPIES))
        .where((F.col(EVENT_ID_COPIES) > 1) & F.col("event_id").isNotNull())
    )


def with_event_id_copies(flagged: DataFrame, conflicting: DataFrame, broadcast: bool) -> DataFrame:
    """The flagged distinct events with ``event_id_copies``, how many distinct events share the
    row's ``event_id`` (1 unless it is in ``conflicting``), and the last rule applied: a row
    no other rule flagged is quarantined as ``conflicting_event_id`` when its id has copies.

    Neither join moves or sorts the events. ``broadcast`` (when the conflicting ids, a data
    fault, are few: every later scan then costs a hash lookup per row) sends them to every
    task; otherwise a shuffled hash join is built on them over the events' partitioning.

    Args:
        flagged: Distinct events with the row rules' ``quarantine_reason`` (:func:`flag_invalid_events`).
        conflicting: :func:`conflicting_event_ids` of the same events.
        broadcast: Send ``conflicting`` to every task.
    """
    conflicting = F.broadcast(conflicting) if broadcast else conflicting.hint("shuffle_hash")
    copies = F.coalesce(F.col(EVENT_ID_COPIES), F.lit(1))
    return (
        flagged.join(conflicting, on="event_id", how="left")
        .select(*RAW_COLUMNS, copies.alias(EVENT_ID_COPIES),
                F.coalesce(F.col("quarantine_reason"), F.when(copies > 1, F.lit("conflicting_event_id"))).alias("quarantine_reason"))
    )


INTERACTION_COLUMNS = ("user_id", "item_id", "user_idx", "item_idx", "weight", "n_events", "first_ts", "last_ts", "split")
EVENT_COUNTS = tuple(f"n_{t}" for t in EVENT_TYPES)


def build_interactions(events: DataFrame, cfg: FeatureConfig) -> DataFrame:
    """Aggregate valid events into one implicit-feedback interaction per (user, item).

    ``weight`` sums ``cfg.event_weights`` over the pair's events; ``first_ts`` is when the
    user first touched the item, which orders the chronological split. ``n_<event_type>``
    count the pair's events of each type, so per-user activity is summed from pairs
    without joining the events again.
    """
    weight = F.coalesce(*[F.when(F.col("event_type") == t, F.lit(w)) for t, w in sorted(cfg.event_weights.items())])
    # Shuffled by (user, item), after a map-side partial aggregate: a user with millions of
    # events (a bot) spreads over every task here; only its pairs meet in one task later.
    return (
        events.groupBy("user_id", "item_id")
        .agg(
            F.sum(weight).alias("weight"),
            F.count(F.lit(1)).cast("int").alias("n_events"),
            F.min("event_ts").alias("first_ts"),
            F.max("event_ts").alias("last_ts"),
            *[F.sum((F.col("event_type") == t).cast("int")).alias(f"n_{t}") for t in EVENT_TYPES],
        )
        .select("user_id", "item_id", "weight", "n_events", "first_ts", "last_ts", *EVENT_COUNTS)
    )


def split_interactions(interactions: DataFrame, cfg: FeatureConfig) -> DataFrame:
    """Cap each user's interactions, then split them chronologically into train / validation / test.

    Rule: order a user's interactions by ``(first_ts, item_id)``, latest first. Only the
    latest ``cfg.max_user_interactions`` are kept (the rest get a null ``split``): per-user
    work downstream (the history, the split window) is bounded whatever one user (a bot)
    does. Of the n kept, users with ``n < cfg.min_user_interactions`` stay train-only.
    Otherwise the latest ``max(1, floor(n * test_fraction))`` go to test, the
    ``max(1, floor(n * val_fraction))`` before them to validation, the rest to train.
    """
    by_user = Window.partitionBy("user_id")
    latest_first = by_user.orderBy(F.col("first_ts").desc(), F.col("item_id").desc())
    n = F.least(F.count(F.lit(1)).over(by_user), F.lit(cfg.max_user_interactions))
    n_test = F.greatest(F.lit(1), F.floor(n * cfg.test_fraction))
    n_val = F.greatest(F.lit(1), F.floor(n * cfg.val_fraction))
    rank = F.row_number().over(latest_first)
    split = (
        F.when(rank > cfg.max_user_interactions, F.lit(None).cast("string"))
        .when(n < cfg.min_user_interactions, "train")
        .when(rank <= n_test, "test")
        .when(rank <= n_test + n_val, "validation")
        .otherwise("train")
    )
    return interactions.withColumn("split", split).select(*interactions.columns, "split")


def build_vocab(ids: DataFrame, column: str, index_column: str) -> DataFrame:
    """Stable vocabulary: distinct ids sorted, numbered from 1 (0 is kept for padding/unknown)."""
    # The sort range-partitions the ids and zipWithIndex numbers them from per-partition
    # counts, so no step holds every id in one partition (a global window would).
    return (
        ids.select(column).where(F.col(column).isNotNull()).distinct()
        .orderBy(column)
        .zipWithIndex("_position")
        .select(column, (F.col("_position") + 1).cast("int").alias(index_column))
    )


def build_user_features(interactions: DataFrame, users: DataFrame, user_vocab: DataFrame, window_end: dt.date,
                        cfg: FeatureConfig) -> DataFrame:
    """Per-user features from train interactions only, so no held-out event leaks into them.

    Columns: ids, event counts by type, ``n_train``/``n_validation``/``n_test``,
    ``recency_days`` (from the last train event to the end of the window), the last
    ``cfg.history_length`` train items (oldest first), and the profile's side features.

    Args:
        interactions: Split interactions with their ``n_<event_type>`` counts.
    """
    train = interactions.where(F.col("split") == "train")
    end = dt.datetime.combine(window_end + dt.timedelta(days=1), dt.time.min, tzinfo=dt.timezone.utc)
    ordered = F.sort_array(F.collect_list(F.struct("first_ts", "item_id", "item_idx")))
    # slice() with a negative start returns [] for arrays shorter than N: start from max(1, size - N + 1).
    recent = F.slice(ordered, F.greatest(F.lit(1), F.size(ordered) - cfg.history_length + 1), cfg.history_length)
    activity = train.groupBy("user_id").agg(
        *[F.sum(c).alias(c) for c in EVENT_COUNTS],
        ((F.lit(end).cast("double") - F.max("last_ts").cast("double")) / 86400.0).alias("recency_days"),
        recent.alias("recent"),
    )
    counts = interactions.groupBy("user_id").agg(
        *[F.sum((F.col("split") == s).cast("int")).alias(f"n_{s}") for s in SPLITS]
    )
    return (
        user_vocab.join(counts, on="user_id", how="inner")
        .join(activity, on="user_id", how="left")
        .join(users, on="user_id", how="left")
        .select(
            "user_id", "user_idx", "n_train", "n_validation", "n_test",
            *[F.coalesce(F.col(c), F.lit(0)).cast("int").alias(c) for c in EVENT_COUNTS],
            "recency_days", F.col("recent.item_id").alias("history_item_ids"), F.col("recent.item_idx").alias("history_item_idx"),
            "age", "gender", "occupation",
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
    capped = split_interactions(build_interactions(events, cfg), cfg).cache()
    split = capped.where(F.col("split").isNotNull())
    over_cap = capped.where(F.col("split").isNull()).agg(
        F.countDistinct("user_id").alias("users"), F.count(F.lit(1)).alias("interactions"))
    user_vocab = build_vocab(split, "user_id", "user_idx").cache()
    item_vocab = build_vocab(split.select("item_id").unionByName(items.select("item_id")), "item_id", "item_idx").cache()
    interactions = (
        split.join(user_vocab, on="user_id", how="inner")
        .join(item_vocab, on="item_id", how="inner")
        .select(*INTERACTION_COLUMNS, *EVENT_COUNTS)
        .cache()
    )
    return FeatureTables(
        interactions=interactions.select(*INTERACTION_COLUMNS),
        user_features=build_user_features(interactions, users, user_vocab, window_end, cfg),
        item_features=build_item_features(interactions, items, item_vocab),
        user_vocab=user_vocab,
        item_vocab=item_vocab,
        over_cap=over_cap,
    )


