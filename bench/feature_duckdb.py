"""The Spark feature job's aggregation re-implemented in DuckDB SQL: the single-node reference.

:func:`extract_features_duckdb` applies the same rules as ``spark_jobs.extract_features``
(without the GX suites) and writes the same tables, so the benchmark can time both on the
same work and compare their outputs table by table. Nothing here imports pyspark.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import shutil
import time
from pathlib import Path
from typing import Iterator, Sequence

from pipeline.catalog import date_partition
from pipeline.config import FeatureConfig
from pipeline.data.contract import EVENT_TYPES, WHITESPACE, RawWindowError, window_partitions
from pipeline.data.raw_files import check_event_files, check_side_table
from pipeline.io import atomic_dir, write_json

log = logging.getLogger(__name__)

DUCKDB_THREADS = 2  # the same two cores Spark's local[2] gets


def sql_string(value: str | Path) -> str:
    """``value`` as a quoted SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"


def sql_list(values: Sequence[str | Path]) -> str:
    """``values`` as a SQL list of string literals."""
    return "[" + ", ".join(sql_string(v) for v in values) + "]"


def _utc_midnight(day: dt.date) -> str:
    return f"TIMESTAMPTZ '{day.isoformat()} 00:00:00+00'"


def extract_features_duckdb(raw_root: str | Path, out_root: str | Path, ds: dt.date, cfg: FeatureConfig,
                            threads: int = DUCKDB_THREADS) -> dict:
    """The Spark job's aggregation in DuckDB SQL: same rules, same tables, single node.

    Mirrors ``spark_jobs.extract_features.run`` without the GX suites: reads only the
    window's partitions, the same files (:func:`pipeline.data.raw_files.data_files`, footers
    checked); keeps the last row read per side-table key; drops exact duplicates on all
    seven contract columns; flags
    quarantined rows (first failing rule wins); aggregates valid events per (user, item)
    with ``cfg.event_weights``; splits each user's interactions chronologically (latest
    by ``(first_ts, item_id)`` go to test, then validation; users below
    ``cfg.min_user_interactions`` stay train-only); numbers vocabularies from 1 over
    sorted ids; builds user and item features from train only. The last-N history keeps
    the latest ``cfg.history_length`` train items, all of them when a user has fewer.

    Args:
        raw_root: Raw root (``events/``, ``items/``, ``users/``).
        out_root: The tables land in ``date_partition(out_root, ds)``, written aside and
            published by rename at the end (:func:`pipeline.io.atomic_dir`).
        ds: Logical date; the window ends on it.
        cfg: Feature settings.
        threads: DuckDB worker threads.

    Returns:
        ``seconds``, ``stages`` (seconds each), ``counts`` (as in the Spark manifest) and
        ``table_rows``.

    Raises:
        RawWindowError: No partition in the window, or too many quarantined rows.
    """
    import duckdb

    started = time.perf_counter()
    raw_root, out_root = Path(raw_root), Path(out_root)
    window_start, window_end = cfg.window(ds)
    partitions = window_partitions(raw_root, window_start, window_end)
    event_files = sql_list([f.path for f in check_event_files(partitions)])
    side_files = {name: sql_list([f.path for f in check_side_table(raw_root, name)]) for name in ("items", "users")}
    ws = sql_string(WHITESPACE)
    start, end = _utc_midnight(window_start), _utc_midnight(window_end + dt.timedelta(days=1))
    event_types = ", ".join(sql_string(t) for t in EVENT_TYPES)
    weight = "CASE event_type " + " ".join(f"WHEN {sql_string(t)} THEN {w!r}::DOUBLE" for t, w in sorted(cfg.event_weights.items())) + " END"
    # Fractions as DOUBLE like Spark's: a DECIMAL product would floor differently at the edges.
    n_test = f"greatest(1, floor(n * {cfg.test_fraction!r}::DOUBLE))"
    n_val = f"greatest(1, floor(n * {cfg.val_fraction!r}::DOUBLE))"

    final_dir = date_partition(out_root, ds.isoformat())
    with atomic_dir(final_dir) as tmp_dir:
        con = duckdb.connect()
        con.execute(f"SET threads = {int(threads)}")
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"SET temp_directory = {sql_string(tmp_dir / '_spill')}")
        stages: dict[str, float] = {}

        @contextlib.contextmanager
        def stage(name: str) -> Iterator[None]:
            began = time.perf_counter()
            yield
            stages[name] = round(time.perf_counter() - began, 3)

        with stage("read_dedup_flag"):
            con.execute(f"""
                CREATE TEMP TABLE flagged AS
                WITH deduped AS (
                    SELECT DISTINCT event_id, user_id, item_id, event_type, event_ts, CAST(value AS DOUBLE) AS value, session_id
                    FROM read_parquet({event_files})
                )
                SELECT *, CASE
                    WHEN event_id IS NULL OR user_id IS NULL OR item_id IS NULL THEN 'null_id'
                    WHEN trim(event_id, {ws}) = '' OR trim(user_id, {ws}) = '' OR trim(item_id, {ws}) = '' THEN 'blank_id'
                    WHEN event_type IS NULL OR event_type NOT IN ({event_types}) THEN 'unknown_event_type'
                    WHEN event_ts IS NULL OR event_ts < {start} OR event_ts >= {end} THEN 'timestamp_outside_window'
                    WHEN isnan(value) OR isinf(value) THEN 'non_finite_value'
                    WHEN value < 0 THEN 'invalid_value'
                    WHEN count(*) OVER (PARTITION BY event_id) > 1 THEN 'conflicting_event_id'
                END AS quarantine_reason
                FROM deduped
                """)
            raw_count = con.execute(f"SELECT count(*) FROM read_parquet({event_files})").fetchone()[0]
            deduped_count = con.execute("SELECT count(*) FROM flagged").fetchone()[0]
        with stage("quarantine"):
            by_reason = dict(con.execute(
                "SELECT quarantine_reason, count(*) FROM flagged WHERE quarantine_reason IS NOT NULL GROUP BY ALL ORDER BY 1").fetchall())
        quarantined = sum(by_reason.values())
        share = quarantined / deduped_count
        if share > cfg.max_quarantine_share:
            raise RawWindowError(f"quarantined share {share:.2%} ({quarantined} of {deduped_count} events: {by_reason}) "
                                 f"exceeds features.max_quarantine_share={cfg.max_quarantine_share:.2%}")
        con.execute("CREATE TEMP VIEW valid AS SELECT * EXCLUDE (quarantine_reason) FROM flagged WHERE quarantine_reason IS NULL")
        con.execute(f"""
            CREATE TEMP VIEW items AS
            SELECT item_id, CAST(year AS INT) AS year, CAST(categories AS VARCHAR[]) AS categories
            FROM read_parquet({side_files['items']}, filename = true, file_row_number = true)
            QUALIFY row_number() OVER (PARTITION BY item_id ORDER BY filename DESC, file_row_number DESC) = 1
            """)
        con.execute(f"""
            CREATE TEMP VIEW users AS
            SELECT user_id, CAST(age AS INT) AS age, gender, occupation
            FROM read_parquet({side_files['users']}, filename = true, file_row_number = true)
            QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY filename DESC, file_row_number DESC) = 1
            """)

        with stage("interactions_split"):
            con.execute(f"""
                CREATE TEMP TABLE split AS
                WITH pairs AS (
                    SELECT user_id, item_id, sum({weight}) AS weight, CAST(count(*) AS INT) AS n_events,
                           min(event_ts) AS first_ts, max(event_ts) AS last_ts
                    FROM valid GROUP BY user_id, item_id
                ), ranked AS (
                    SELECT *, count(*) OVER (PARTITION BY user_id) AS n,
                           row_number() OVER (PARTITION BY user_id ORDER BY first_ts DESC, item_id DESC) AS latest_rank
                    FROM pairs
                )
                SELECT user_id, item_id, weight, n_events, first_ts, last_ts, CASE
                    WHEN n < {int(cfg.min_user_interactions)} THEN 'train'
                    WHEN latest_rank <= {n_test} THEN 'test'
                    WHEN latest_rank <= {n_test} + {n_val} THEN 'validation'
                    ELSE 'train'
                END AS split
                FROM ranked
                """)
        with stage("vocab"):
            con.execute("""
                CREATE TEMP TABLE user_vocab AS
                SELECT user_id, CAST(row_number() OVER (ORDER BY user_id) AS INT) AS user_idx
                FROM (SELECT DISTINCT user_id FROM split WHERE user_id IS NOT NULL)
                """)
            con.execute("""
                CREATE TEMP TABLE item_vocab AS
                SELECT item_id, CAST(row_number() OVER (ORDER BY item_id) AS INT) AS item_idx
                FROM (SELECT item_id FROM split UNION SELECT item_id FROM items) WHERE item_id IS NOT NULL
                """)
            con.execute("""
                CREATE TEMP TABLE interactions AS
                SELECT s.user_id, s.item_id, u.user_idx, i.item_idx, s.weight, s.n_events, s.first_ts, s.last_ts, s.split
                FROM split AS s JOIN user_vocab AS u ON s.user_id = u.user_id JOIN item_vocab AS i ON s.item_id = i.item_id
                """)
        type_counts = ", ".join(f"sum(CAST(e.event_type = {sql_string(t)} AS INT)) AS n_{t}" for t in EVENT_TYPES)
        type_columns = ", ".join(f"CAST(coalesce(a.n_{t}, 0) AS INT) AS n_{t}" for t in EVENT_TYPES)
        with stage("features"):
            con.execute(f"""
                CREATE TEMP TABLE user_features AS
                WITH train AS (
                    SELECT user_id, item_id, item_idx, first_ts FROM interactions WHERE split = 'train'
                ), activity AS (
                    SELECT e.user_id, {type_counts},
                           (epoch({end}) - epoch(max(e.event_ts))) / 86400.0::DOUBLE AS recency_days
                    FROM valid AS e JOIN train AS t ON e.user_id = t.user_id AND e.item_id = t.item_id
                    GROUP BY e.user_id
                ), history AS (
                    SELECT user_id, list(item_id ORDER BY first_ts, item_id) AS history_item_ids,
                           list(item_idx ORDER BY first_ts, item_id) AS history_item_idx
                    FROM (SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY first_ts DESC, item_id DESC) AS latest_rank
                          FROM train)
                    WHERE latest_rank <= {int(cfg.history_length)}
                    GROUP BY user_id
                ), counts AS (
                    SELECT user_id, sum(CAST(split = 'train' AS INT)) AS n_train,
                           sum(CAST(split = 'validation' AS INT)) AS n_validation, sum(CAST(split = 'test' AS INT)) AS n_test
                    FROM interactions GROUP BY user_id
                )
                SELECT v.user_id, v.user_idx, c.n_train, c.n_validation, c.n_test, {type_columns},
                       a.recency_days, h.history_item_ids, h.history_item_idx, p.age, p.gender, p.occupation
                FROM user_vocab AS v
                JOIN counts AS c ON v.user_id = c.user_id
                LEFT JOIN activity AS a ON v.user_id = a.user_id
                LEFT JOIN history AS h ON v.user_id = h.user_id
                LEFT JOIN users AS p ON v.user_id = p.user_id
                """)
            con.execute("""
                CREATE TEMP TABLE item_features AS
                WITH stats AS (
                    SELECT item_id, CAST(count(*) AS INT) AS popularity, sum(weight) AS weighted_popularity,
                           CAST(sum(n_events) AS INT) AS n_events
                    FROM interactions WHERE split = 'train' GROUP BY item_id
                )
                SELECT v.item_id, v.item_idx, coalesce(s.popularity, 0) AS popularity,
                       coalesce(s.weighted_popularity, 0.0) AS weighted_popularity, coalesce(s.n_events, 0) AS n_events,
                       c.year, c.categories
                FROM item_vocab AS v LEFT JOIN stats AS s ON v.item_id = s.item_id LEFT JOIN items AS c ON v.item_id = c.item_id
                """)

        # Rows sorted by the Spark job's write keys, so that a re-run writes the same content.
        with stage("write"):
            con.execute(f"""
                COPY (SELECT * FROM interactions ORDER BY user_idx, item_idx)
                TO {sql_string(tmp_dir / 'interactions')} (FORMAT parquet, PARTITION_BY (split))
                """)
            sort_keys = {"user_features": "user_idx", "item_features": "item_idx", "user_vocab": "user_idx", "item_vocab": "item_idx"}
            for name, key in sort_keys.items():
                con.execute(f"COPY (SELECT * FROM {name} ORDER BY {key}) TO {sql_string(_single_file(tmp_dir, name))} (FORMAT parquet)")
            con.execute(f"""
                COPY (SELECT * FROM flagged WHERE quarantine_reason IS NOT NULL ORDER BY event_id, event_ts)
                TO {sql_string(_single_file(tmp_dir, 'quarantine'))} (FORMAT parquet)
                """)
        with stage("count_written"):  # from the files, as the Spark job counts its written tables
            split_counts = dict(con.execute(f"""
                SELECT split, count(*)
                FROM read_parquet({sql_string(tmp_dir / 'interactions' / '*' / '*.parquet')}, hive_partitioning = true)
                GROUP BY split
                """).fetchall())
            table_rows = {
                name: con.execute(f"SELECT count(*) FROM read_parquet({sql_string(tmp_dir / name / '**' / '*.parquet')})").fetchone()[0]
                for name in ("interactions", *sort_keys, "quarantine")
            }
        con.close()
        shutil.rmtree(tmp_dir / "_spill", ignore_errors=True)

    summary = {
        "seconds": round(time.perf_counter() - started, 3),
        "stages": stages,
        "counts": {
            "raw_events": raw_count,
            "exact_duplicates": raw_count - deduped_count,
            "quarantined": quarantined,
            "quarantined_by_reason": by_reason,
            "valid_events": deduped_count - quarantined,
            "interactions_by_split": {s: split_counts.get(s, 0) for s in ("train", "validation", "test")},
        },
        "table_rows": table_rows,
    }
    write_json(final_dir / "summary.json", summary)
    log.info("duckdb wrote %s in %.1fs: %s", final_dir, summary["seconds"], stages)
    return summary


def _single_file(directory: Path, table: str) -> Path:
    (directory / table).mkdir(parents=True, exist_ok=True)
    return directory / table / "part-00000.parquet"
