"""Pure DataFrame transforms of the feature job: valid events in, feature tables out.

Each function takes DataFrames and settings and returns a DataFrame; none reads or writes
files (the job's extract, clean and load steps do). The raw events are checked,
deduplicated and flagged before, by :mod:`spark_jobs.cleaning` with the rules of
:mod:`spark_jobs.event_rules`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from pipeline.config import FeatureConfig
from pipeline.data.contract import EVENT_TYPES
from pipeline.data.features import SPLITS

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
    ``train_rank`` numbers a user's train interactions in the same order (1 = latest; null
    off train), so the user's recent history is picked here, not by sorting again.
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
    train_rank = F.when(split == "train", F.when(n < cfg.min_user_interactions, rank).otherwise(rank - n_test - n_val))
    return interactions.select(*interactions.columns, split.alias("split"), train_rank.alias("train_rank"))


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
        interactions: Split interactions with their ``n_<event_type>`` counts and ``train_rank``.
    """
    end = dt.datetime.combine(window_end + dt.timedelta(days=1), dt.time.min, tzinfo=dt.timezone.utc)
    train = F.col("split") == "train"
    # Grouped by the integer index: hashing the string ids cost more than the sums.
    counts = interactions.groupBy("user_idx").agg(
        *[F.sum((F.col("split") == s).cast("int")).alias(f"n_{s}") for s in SPLITS],
        *[F.sum(F.when(train, F.col(c))).alias(c) for c in EVENT_COUNTS],
        F.max(F.when(train, F.col("last_ts"))).alias("last_train_ts"),
    )
    # The list is collected apart, over the latest history_length train items alone: an
    # aggregate with collect_list is not code-generated, so every function in it would run interpreted.
    history = (
        interactions.where(F.col("train_rank") <= cfg.history_length).groupBy("user_idx")
        .agg(F.sort_array(F.collect_list(F.struct("first_ts", "item_id", "item_idx"))).alias("recent"))
    )
    return (
        user_vocab.join(counts, on="user_idx", how="inner")
        .join(history, on="user_idx", how="left")  # none for a user without train interactions
        .join(users, on="user_id", how="left")
        .select(
            "user_id", "user_idx", "n_train", "n_validation", "n_test",
            *[F.coalesce(F.col(c), F.lit(0)).cast("int").alias(c) for c in EVENT_COUNTS],
            ((F.lit(end).cast("double") - F.col("last_train_ts").cast("double")) / 86400.0).alias("recency_days"),
            F.col("recent.item_id").alias("history_item_ids"), F.col("recent.item_idx").alias("history_item_idx"),
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
    stats = train.groupBy("item_idx").agg(
        F.count(F.lit(1)).cast("int").alias("popularity"),
        F.sum("weight").alias("weighted_popularity"),
        F.sum("n_events").cast("int").alias("n_events"),
    )
    return (
        item_vocab.join(stats, on="item_idx", how="left")
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
        .select(*INTERACTION_COLUMNS, *EVENT_COUNTS, "train_rank")
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


