"""Benchmark the Spark feature job against the same aggregation in DuckDB, side by side.

Run as ``.venv/bin/python bench/features.py [--sizes 1000000 10000000] [--repeats 3]``.

For each size it generates a synthetic raw log once (under ``bench/work/``), then runs,
``--repeats`` times and in a rotating order so that noise from a shared machine spreads
evenly over the engines:

* ``spark``: ``python -m spark_jobs.extract_features ... --master local[2]``, exactly as
  users run it, GX validation on (the real job);
* ``spark_no_validation``: the same with ``--no-validation`` (the same work as DuckDB);
* ``duckdb``: :func:`extract_features_duckdb`, the job's aggregation written in SQL, run
  in a subprocess of this script (``--duckdb-only``) so that both are measured alike.

Every engine is measured the same way: wall time of the process (start-up included), and
peak RSS and CPU time summed over its process tree (the JVM is a child of the Spark job's
Python), sampled every ``POLL_SECONDS``. "Job time" leaves start-up out: the Spark job's
own ``wrote ... in X.Xs`` log line, DuckDB's time from connecting to the last write.
Spark's stages are read off the timestamps of the job's log lines.

Check: DuckDB's interactions per split must equal every Spark manifest's
``counts.interactions_by_split``; the first run of each engine is also compared table by
table (:func:`compare_outputs`). A mismatch is recorded in the results, not raised.

Results go to ``bench/results/features.json`` (every run, medians, ratios, targets,
output checks) and ``bench/results/features.md`` (the same tables as printed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: make `pipeline` importable
    sys.path.insert(0, str(REPO_ROOT))

from pipeline.config import FeatureConfig, load_config  # noqa: E402
from pipeline.data.contract import EVENT_TYPES  # noqa: E402

log = logging.getLogger("bench.features")

WORK_DIR = REPO_ROOT / "bench" / "work"
RESULTS_DIR = REPO_ROOT / "bench" / "results"

DS = dt.date(2024, 1, 31)
WINDOW_DAYS = 30
SEED = 20240131
# Events -> (users, items) of the synthetic world; other sizes get one user per
# EVENTS_PER_USER events and one item per EVENTS_PER_ITEM.
WORLD_SHAPES = {1_000_000: (10_000, 5_000), 10_000_000: (50_000, 20_000)}
EVENTS_PER_USER, EVENTS_PER_ITEM = 100, 200
DEFAULT_SIZES = (1_000_000, 10_000_000)
DEFAULT_REPEATS = 3

SPARK_MASTER = "local[2]"
DUCKDB_THREADS = 2  # the same two cores Spark's local[2] gets
POLL_SECONDS = 0.2
RUN_TIMEOUT_SECONDS = 3600

ENGINES = ("spark", "spark_no_validation", "duckdb")
TARGET_SPARK_OVER_DUCKDB = 3.0  # at the largest size

# Job log messages that close each stage, in order; a stage lasts from the previous mark.
SPARK_STAGE_MARKS = (
    ("read", "read "),
    ("dedup", "events: "),
    ("raw_checks", "validated raw_events"),
    ("quarantine", "quarantined "),
    ("transform_write_checks", "wrote "),
)
SPARK_LOG_LINE = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3}) \w+ (?:extract_features|pipeline\.validation): (.*)$")
SPARK_JOB_TIME = re.compile(r"^wrote \S+ in ([\d.]+)s")

DOUBLE_TOLERANCE = 1e-9
# Table -> (key columns, compared columns) for the Spark/DuckDB output comparison.
COMPARED_TABLES = {
    "interactions": (("user_id", "item_id"), ("user_idx", "item_idx", "weight", "n_events", "first_ts", "last_ts", "split")),
    "user_features": (("user_id",), (
        "user_idx", "n_train", "n_validation", "n_test", *[f"n_{t}" for t in EVENT_TYPES],
        "recency_days", "history_item_ids", "history_item_idx", "age", "gender", "occupation")),
    "item_features": (("item_id",), ("item_idx", "popularity", "weighted_popularity", "n_events", "year", "categories")),
    "user_vocab": (("user_id",), ("user_idx",)),
    "item_vocab": (("item_id",), ("item_idx",)),
}


# ----------------------------------------------------------------------------- DuckDB reference


def _sql_string(value: str | Path) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _sql_list(values: Sequence[str | Path]) -> str:
    return "[" + ", ".join(_sql_string(v) for v in values) + "]"


def _utc_midnight(day: dt.date) -> str:
    return f"TIMESTAMPTZ '{day.isoformat()} 00:00:00+00'"


def extract_features_duckdb(raw_root: str | Path, out_root: str | Path, ds: dt.date, cfg: FeatureConfig,
                            threads: int = DUCKDB_THREADS) -> dict:
    """The Spark job's aggregation in DuckDB SQL: same rules, same tables, single node.

    Mirrors ``spark_jobs.extract_features.run`` without the GX suites: reads only the
    window's partitions; drops exact duplicates on all seven contract columns; flags
    quarantined rows (first failing rule wins); aggregates valid events per (user, item)
    with ``cfg.event_weights``; splits each user's interactions chronologically (latest
    by ``(first_ts, item_id)`` go to test, then validation; users below
    ``cfg.min_user_interactions`` stay train-only); numbers vocabularies from 1 over
    sorted ids; builds user and item features from train only. The last-N history keeps
    the latest ``cfg.history_length`` train items, all of them when a user has fewer.

    Args:
        raw_root: Raw root (``events/``, ``items/``, ``users/``).
        out_root: The tables land in ``<out_root>/ds=<ds>/``, renamed into place at the end.
        ds: Logical date; the window ends on it.
        cfg: Feature settings.
        threads: DuckDB worker threads.

    Returns:
        ``seconds``, ``stages`` (seconds each), ``counts`` (as in the Spark manifest) and
        ``table_rows``.

    Raises:
        RuntimeError: No partition in the window, or too many quarantined rows.
    """
    import duckdb

    started = time.perf_counter()
    raw_root, out_root = Path(raw_root), Path(out_root)
    window_start, window_end = cfg.window(ds)
    # The Spark job's window_partitions(), restated so that this process never imports pyspark.
    days = [window_start + dt.timedelta(days=i) for i in range(cfg.window_days)]
    partitions = [raw_root / "events" / f"ds={day}" for day in days if (raw_root / "events" / f"ds={day}").is_dir()]
    if not partitions:
        raise RuntimeError(f"empty window: no event partitions ds={window_start}..ds={window_end} under {raw_root / 'events'}")
    event_files = _sql_list([p / "*.parquet" for p in partitions])
    start, end = _utc_midnight(window_start), _utc_midnight(window_end + dt.timedelta(days=1))
    event_types = ", ".join(_sql_string(t) for t in EVENT_TYPES)
    weight = "CASE event_type " + " ".join(f"WHEN {_sql_string(t)} THEN {w!r}::DOUBLE" for t, w in sorted(cfg.event_weights.items())) + " END"
    # Fractions as DOUBLE like Spark's: a DECIMAL product would floor differently at the edges.
    n_test = f"greatest(1, floor(n * {cfg.test_fraction!r}::DOUBLE))"
    n_val = f"greatest(1, floor(n * {cfg.val_fraction!r}::DOUBLE))"

    tmp_dir = out_root / f".tmp-ds={ds}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir(parents=True)
    con = duckdb.connect()
    con.execute(f"SET threads = {int(threads)}")
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"SET temp_directory = {_sql_string(tmp_dir / '_spill')}")
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
                WHEN event_type IS NULL OR event_type NOT IN ({event_types}) THEN 'unknown_event_type'
                WHEN event_ts IS NULL OR event_ts < {start} OR event_ts >= {end} THEN 'timestamp_outside_window'
                WHEN isnan(value) OR value < 0 THEN 'invalid_value'
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
        raise RuntimeError(f"quarantined share {share:.2%} ({quarantined} of {deduped_count} events: {by_reason}) "
                           f"exceeds features.max_quarantine_share={cfg.max_quarantine_share:.2%}")
    con.execute("CREATE TEMP VIEW valid AS SELECT * EXCLUDE (quarantine_reason) FROM flagged WHERE quarantine_reason IS NULL")
    con.execute(f"""
        CREATE TEMP VIEW items AS
        SELECT DISTINCT ON (item_id) item_id, CAST(year AS INT) AS year, CAST(categories AS VARCHAR[]) AS categories
        FROM read_parquet({_sql_string(raw_root / 'items' / '*.parquet')})
        """)
    con.execute(f"""
        CREATE TEMP VIEW users AS
        SELECT DISTINCT ON (user_id) user_id, CAST(age AS INT) AS age, gender, occupation
        FROM read_parquet({_sql_string(raw_root / 'users' / '*.parquet')})
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
    type_counts = ", ".join(f"sum(CAST(e.event_type = {_sql_string(t)} AS INT)) AS n_{t}" for t in EVENT_TYPES)
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
            TO {_sql_string(tmp_dir / 'interactions')} (FORMAT parquet, PARTITION_BY (split))
            """)
        sort_keys = {"user_features": "user_idx", "item_features": "item_idx", "user_vocab": "user_idx", "item_vocab": "item_idx"}
        for name, key in sort_keys.items():
            con.execute(f"COPY (SELECT * FROM {name} ORDER BY {key}) TO {_sql_string(_single_file(tmp_dir, name))} (FORMAT parquet)")
        con.execute(f"""
            COPY (SELECT * FROM flagged WHERE quarantine_reason IS NOT NULL ORDER BY event_id, event_ts)
            TO {_sql_string(_single_file(tmp_dir, 'quarantine'))} (FORMAT parquet)
            """)
    with stage("count_written"):  # from the files, as the Spark job counts its written tables
        split_counts = dict(con.execute(f"""
            SELECT split, count(*)
            FROM read_parquet({_sql_string(tmp_dir / 'interactions' / '*' / '*.parquet')}, hive_partitioning = true)
            GROUP BY split
            """).fetchall())
        table_rows = {
            name: con.execute(f"SELECT count(*) FROM read_parquet({_sql_string(tmp_dir / name / '**' / '*.parquet')})").fetchone()[0]
            for name in ("interactions", *sort_keys, "quarantine")
        }
    con.close()
    shutil.rmtree(tmp_dir / "_spill", ignore_errors=True)

    final_dir = out_root / f"ds={ds}"
    shutil.rmtree(final_dir, ignore_errors=True)
    os.rename(tmp_dir, final_dir)
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
    (final_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    log.info("duckdb wrote %s in %.1fs: %s", final_dir, summary["seconds"], stages)
    return summary


def _single_file(directory: Path, table: str) -> Path:
    (directory / table).mkdir(parents=True, exist_ok=True)
    return directory / table / "part-00000.parquet"


# ----------------------------------------------------------------------------- measuring


@dataclasses.dataclass(frozen=True)
class ProcessMeasurement:
    """One finished process: wall time, peak RSS and CPU time of its whole tree, exit code and output."""

    wall_s: float
    peak_rss_mb: float
    cpu_s: float
    returncode: int
    stdout: str
    stderr: str


class _TreeSampler(threading.Thread):
    """Samples the summed RSS and CPU time of a process and all its descendants until stopped.

    CPU time (user + system, summed over every process seen) is steadier than wall time on a
    shared machine: waiting for a core counts in the one, not the other. It misses at most
    the last ``POLL_SECONDS`` of each process.
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_bytes = pid, 0
        self.cpu_by_pid: dict[int, float] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._stop_event.is_set():
            try:
                root = psutil.Process(self.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            total = 0
            for proc in tree:
                try:
                    with proc.oneshot():
                        total += proc.memory_info().rss
                        cpu = proc.cpu_times()
                    self.cpu_by_pid[proc.pid] = cpu.user + cpu.system
                except psutil.Error:  # exited between listing and sampling
                    pass
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop_event.wait(POLL_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def measure_process(command: Sequence[str], log_stem: Path) -> ProcessMeasurement:
    """Run ``command`` from the repo root; time it and sample its tree's RSS and CPU every ``POLL_SECONDS``.

    Output goes to ``<log_stem>.out`` / ``.err`` (kept for inspection) and is returned too.
    A run over ``RUN_TIMEOUT_SECONDS`` is killed (its own process group only).
    """
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    with out_path.open("w") as out, err_path.open("w") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(list(command), cwd=REPO_ROOT, stdout=out, stderr=err, start_new_session=True)
        sampler = _TreeSampler(proc.pid)
        sampler.start()
        try:
            returncode = proc.wait(timeout=RUN_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
        wall_s = time.perf_counter() - started
        sampler.stop()
    return ProcessMeasurement(round(wall_s, 3), round(sampler.peak_bytes / 2**20, 1), round(sum(sampler.cpu_by_pid.values()), 1),
                              returncode, out_path.read_text(), err_path.read_text())


def parse_spark_log(stderr: str, wall_s: float) -> tuple[float | None, dict[str, float]]:
    """The job's own time (``wrote ... in X.Xs``) and stage durations from its log timestamps.

    Stages run from one job log line to the next (see ``SPARK_STAGE_MARKS``), starting when
    ``run()`` starts; ``startup_shutdown`` is the rest of the wall time (interpreter, JVM,
    session, ``spark.stop()``).
    """
    marks: dict[str, float] = {}
    job_s = None
    for line in stderr.splitlines():
        match = SPARK_LOG_LINE.match(line)
        if not match:
            continue
        at = dt.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        message = match[2]
        for stage, prefix in SPARK_STAGE_MARKS:
            if message.startswith(prefix):
                marks.setdefault(stage, at)
        if found := SPARK_JOB_TIME.match(message):
            job_s = float(found[1])
    if job_s is None or "transform_write_checks" not in marks:
        return None, {}
    stages = {"startup_shutdown": round(wall_s - job_s, 2)}
    previous = marks["transform_write_checks"] - job_s
    for stage, _ in SPARK_STAGE_MARKS:
        if stage in marks:
            stages[stage] = round(marks[stage] - previous, 2)
            previous = marks[stage]
    return job_s, stages


def run_spark(raw_root: Path, out_root: Path, log_stem: Path, validate: bool) -> dict:
    """Run the Spark job as users do and read its manifest."""
    command = [
        sys.executable, "-m", "spark_jobs.extract_features", "--raw", str(raw_root), "--out", str(out_root),
        "--ds", DS.isoformat(), "--window-days", str(WINDOW_DAYS), "--master", SPARK_MASTER,
    ] + ([] if validate else ["--no-validation"])
    measured = measure_process(command, log_stem)
    job_s, stages = parse_spark_log(measured.stderr, measured.wall_s)
    record = {"wall_s": measured.wall_s, "job_s": job_s, "cpu_s": measured.cpu_s, "peak_rss_mb": measured.peak_rss_mb, "stages": stages,
              "returncode": measured.returncode, "log": str(log_stem.relative_to(REPO_ROOT)) + ".err"}
    manifest_path = out_root / f"ds={DS}" / "manifest.json"
    if measured.returncode != 0 or not manifest_path.exists():
        record["error"] = _tail(measured.stderr)
        return record
    manifest = json.loads(manifest_path.read_text())
    record["counts"] = manifest["counts"]
    record["table_rows"] = {name: table["rows"] for name, table in manifest["tables"].items()}
    return record


def run_duckdb(raw_root: Path, out_root: Path, log_stem: Path) -> dict:
    """Run :func:`extract_features_duckdb` in a subprocess of this script, measured like Spark."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--duckdb-only", "--raw", str(raw_root), "--out", str(out_root),
        "--ds", DS.isoformat(), "--window-days", str(WINDOW_DAYS), "--threads", str(DUCKDB_THREADS),
    ]
    measured = measure_process(command, log_stem)
    record = {"wall_s": measured.wall_s, "job_s": None, "cpu_s": measured.cpu_s, "peak_rss_mb": measured.peak_rss_mb, "stages": {},
              "returncode": measured.returncode, "log": str(log_stem.relative_to(REPO_ROOT)) + ".err"}
    if measured.returncode != 0:
        record["error"] = _tail(measured.stderr)
        return record
    summary = json.loads(measured.stdout.strip().splitlines()[-1])
    record.update(job_s=summary["seconds"], stages=summary["stages"], counts=summary["counts"], table_rows=summary["table_rows"])
    return record


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ----------------------------------------------------------------------------- data and checks


def world_shape(events: int) -> tuple[int, int]:
    """Users and items of the synthetic world for a number of events."""
    return WORLD_SHAPES.get(events, (max(10, events // EVENTS_PER_USER), max(10, events // EVENTS_PER_ITEM)))


def ensure_synthetic_logs(events: int) -> tuple[Path, dict]:
    """Generate the raw log for ``events`` once; a later call with the same settings reuses it."""
    from pipeline.data.synthetic import generate_synthetic_logs

    users, items = world_shape(events)
    settings = {"users": users, "items": items, "days": WINDOW_DAYS, "events": events, "seed": SEED, "end_date": DS.isoformat()}
    raw_root = WORK_DIR / f"raw-{events}"
    marker = raw_root / "synthetic.json"
    if marker.exists() and json.loads(marker.read_text())["settings"] == settings:
        return raw_root, json.loads(marker.read_text())["summary"]
    shutil.rmtree(raw_root, ignore_errors=True)
    summary = generate_synthetic_logs(raw_root, users, items, WINDOW_DAYS, events, SEED, DS)
    marker.write_text(json.dumps({"settings": settings, "summary": summary}, indent=2))
    return raw_root, summary


def compare_outputs(spark_dir: Path, duckdb_dir: Path) -> dict[str, dict]:
    """Compare two feature outputs table by table, joined on each table's key.

    Returns:
        Table -> ``spark_rows``, ``duckdb_rows``, ``only_spark``, ``only_duckdb`` (keys on
        one side only) and ``differing`` (column -> rows whose value differs, when any).
        Doubles are compared to a relative ``DOUBLE_TOLERANCE``, timestamps as microseconds.
    """
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads = {DUCKDB_THREADS}")
    con.execute("SET TimeZone = 'UTC'")
    report = {}
    for table, (keys, columns) in COMPARED_TABLES.items():
        sides = {}
        for side, root in (("s", spark_dir), ("d", duckdb_dir)):
            pattern = root / table / ("*/*.parquet" if table == "interactions" else "*.parquet")
            con.execute(f"CREATE OR REPLACE TEMP VIEW {side} AS SELECT *, true AS _present FROM read_parquet({_sql_string(pattern)}, hive_partitioning = true)")
            sides[side] = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE {side})").fetchall())

        def differs(column: str) -> str:
            s_type, d_type = sides["s"][column], sides["d"][column]
            if s_type.startswith("TIMESTAMP") or d_type.startswith("TIMESTAMP"):
                return f"epoch_us(s.{column}) IS DISTINCT FROM epoch_us(d.{column})"
            if {s_type, d_type} & {"DOUBLE", "FLOAT"}:  # the engines may round the last bits differently
                return (f"((s.{column} IS NULL) <> (d.{column} IS NULL) "
                        f"OR abs(s.{column} - d.{column}) > {DOUBLE_TOLERANCE} * greatest(1, abs(s.{column})))")
            return f"s.{column} IS DISTINCT FROM d.{column}"

        on = " AND ".join(f"s.{k} = d.{k}" for k in keys)
        both = "s._present AND d._present"
        counts = con.execute(
            "SELECT count(*) FILTER (WHERE s._present), count(*) FILTER (WHERE d._present), "
            "count(*) FILTER (WHERE d._present IS NULL), count(*) FILTER (WHERE s._present IS NULL), "
            + ", ".join(f"count(*) FILTER (WHERE {both} AND ({differs(c)}))" for c in columns)
            + f" FROM s FULL OUTER JOIN d ON {on}"
        ).fetchone()
        report[table] = {
            "spark_rows": counts[0], "duckdb_rows": counts[1], "only_spark": counts[2], "only_duckdb": counts[3],
            "differing": {c: n for c, n in zip(columns, counts[4:]) if n},
        }
    con.close()
    return report


def check_size(runs: dict[str, list[dict]], spark_dir: Path | None, duckdb_dir: Path | None) -> tuple[dict, list[str]]:
    """Interactions by split of every Spark run against DuckDB's, plus a table-by-table diff.

    Returns:
        The checks (JSON-able) and a readable line for each problem found.
    """
    problems = []
    reference = next((r["counts"]["interactions_by_split"] for r in runs["duckdb"] if "counts" in r), None)
    split_checks = []
    for engine in ("spark", "spark_no_validation"):
        for repeat, run in enumerate(runs[engine]):
            if "counts" not in run or reference is None:
                continue
            spark_split = run["counts"]["interactions_by_split"]
            split_checks.append({"engine": engine, "repeat": repeat, "spark": spark_split, "duckdb": reference, "match": spark_split == reference})
            if spark_split != reference:
                problems.append(f"{engine} run {repeat}: interactions by split {spark_split} != DuckDB {reference}")
    for engine, engine_runs in runs.items():
        distinct = {json.dumps(r["counts"], sort_keys=True) for r in engine_runs if "counts" in r}
        if len(distinct) > 1:
            problems.append(f"{engine}: counts differ between repeats: {sorted(distinct)}")
    tables = compare_outputs(spark_dir, duckdb_dir) if spark_dir and duckdb_dir else {}
    for table, diff in tables.items():
        if diff["only_spark"] or diff["only_duckdb"] or diff["differing"]:
            problems.append(f"{table}: Spark and DuckDB outputs differ: {diff}")
    return {"interactions_by_split": split_checks, "tables": tables}, problems


# ----------------------------------------------------------------------------- summary


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def summarize_engine(runs: list[dict], events: int) -> dict:
    """Medians over the successful runs of one engine at one size."""
    ok = [r for r in runs if "counts" in r]
    wall = _median([r["wall_s"] for r in ok])
    stage_names = list(dict.fromkeys(name for r in ok for name in r["stages"]))
    return {
        "runs": runs,
        "successful_runs": len(ok),
        "median_wall_s": wall,
        "median_job_s": _median([r["job_s"] for r in ok]),
        "median_cpu_s": _median([r["cpu_s"] for r in ok]),
        "events_per_s": round(events / wall) if wall else None,
        "median_peak_rss_mb": _median([r["peak_rss_mb"] for r in ok]),
        "max_peak_rss_mb": max((r["peak_rss_mb"] for r in ok), default=None),
        "median_stages_s": {name: _median([r["stages"].get(name) for r in ok]) for name in stage_names},
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 2) if numerator and denominator else None


def size_ratios(engines: dict[str, dict]) -> dict:
    """Spark over DuckDB, from the medians measured in this run, for wall and job time."""
    duckdb = engines["duckdb"]
    return {
        f"{engine}_over_duckdb": {
            "wall": _ratio(engines[engine]["median_wall_s"], duckdb["median_wall_s"]),
            "job": _ratio(engines[engine]["median_job_s"], duckdb["median_job_s"]),
            "cpu": _ratio(engines[engine]["median_cpu_s"], duckdb["median_cpu_s"]),
        }
        for engine in ("spark", "spark_no_validation")
    }


def scaling_and_targets(sizes: dict[int, dict]) -> tuple[dict, dict]:
    """time(largest) / time(smallest) per engine, and the two targets, when two sizes ran."""
    if len(sizes) < 2:
        return {}, {}
    small, large = min(sizes), max(sizes)
    linear = large / small
    scaling = {"from_events": small, "to_events": large, "linear": linear, "engines": {
        engine: {
            "wall": _ratio(sizes[large]["engines"][engine]["median_wall_s"], sizes[small]["engines"][engine]["median_wall_s"]),
            "job": _ratio(sizes[large]["engines"][engine]["median_job_s"], sizes[small]["engines"][engine]["median_job_s"]),
            "cpu": _ratio(sizes[large]["engines"][engine]["median_cpu_s"], sizes[small]["engines"][engine]["median_cpu_s"]),
        }
        for engine in ENGINES
    }}
    ratios = sizes[large]["ratios"]
    targets = {
        "spark_within_3x_of_duckdb": {
            "at_events": large, "threshold": TARGET_SPARK_OVER_DUCKDB, "measure": "median wall time",
            **{engine: {"ratio": ratios[f"{engine}_over_duckdb"]["wall"],
                        "met": _at_most(ratios[f"{engine}_over_duckdb"]["wall"], TARGET_SPARK_OVER_DUCKDB)}
               for engine in ("spark", "spark_no_validation")},
        },
        "scaling_no_worse_than_linear": {
            "from_events": small, "to_events": large, "threshold": linear, "measure": "median wall time",
            **{engine: {"ratio": s["wall"], "met": _at_most(s["wall"], linear)} for engine, s in scaling["engines"].items()},
        },
    }
    return scaling, targets


def _at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def machine_info() -> dict:
    """What the numbers were measured on."""
    import psutil

    java = subprocess.run(["java", "-version"], capture_output=True, text=True)
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu_model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyspark": importlib.metadata.version("pyspark"),
        "duckdb": importlib.metadata.version("duckdb"),
        "java": (java.stderr or java.stdout).splitlines()[0] if java.returncode == 0 else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


ENGINE_LABELS = {"spark": "Spark (GX on, the real job)", "spark_no_validation": "Spark --no-validation", "duckdb": "DuckDB (same work)"}


def render_markdown(results: dict) -> str:
    """The results as Markdown tables: per size and engine, ratios, scaling, targets, stages, checks."""
    machine, settings = results["machine"], results["settings"]
    lines = [
        "# Feature job benchmark: Spark vs DuckDB",
        "",
        f"{results['date']} · {machine['nproc']} cores ({machine['cpu']}), {machine['memory_gb']} GB · Python {machine['python']}, "
        f"PySpark {machine['pyspark']} ({settings['spark_master']}), DuckDB {machine['duckdb']} (threads={settings['duckdb_threads']}) · "
        f"ds={settings['ds']}, window {settings['window_days']} days · medians of {settings['repeats']} runs "
        f"(load average at start {machine['load_average_at_start']}, at end {results.get('load_average_at_end')}; shared machine, so noisy).",
        "",
        "Wall: whole process incl. start-up; job: without start-up; CPU: user + system over the process tree "
        "(steadier than wall on a busy machine). Peak RSS: summed over the process tree.",
        "",
        "| events | engine | median wall s | median job s | median CPU s | events/s (wall) | peak RSS MB | wall s, all runs |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for events, size in results["sizes"].items():
        for engine, summary in size["engines"].items():
            walls = ", ".join(_fmt(r["wall_s"]) if "counts" in r else "failed" for r in summary["runs"])
            lines.append(f"| {int(events):,} | {ENGINE_LABELS[engine]} | {_fmt(summary['median_wall_s'])} | {_fmt(summary['median_job_s'])} "
                         f"| {_fmt(summary['median_cpu_s'])} "
                         f"| {_fmt(summary['events_per_s'], 0)} | {_fmt(summary['median_peak_rss_mb'], 0)} | {walls} |")
    lines += ["", "Spark / DuckDB, from the medians above (real job / --no-validation):", "",
              "| events | wall | job | CPU |", "|---:|---:|---:|---:|"]
    for events, size in results["sizes"].items():
        real, same = size["ratios"]["spark_over_duckdb"], size["ratios"]["spark_no_validation_over_duckdb"]
        lines.append(f"| {int(events):,} | " + " | ".join(f"{_fmt(real[m], 1)} / {_fmt(same[m], 1)}" for m in ("wall", "job", "cpu")) + " |")
    if results["scaling"]:
        s = results["scaling"]
        lines += ["", f"Scaling {s['from_events']:,} -> {s['to_events']:,} events (linear = {s['linear']:g}):", "",
                  "| engine | wall ratio | job ratio | CPU ratio |", "|---|---:|---:|---:|"]
        lines += [f"| {ENGINE_LABELS[e]} | {_fmt(v['wall'], 2)} | {_fmt(v['job'], 2)} | {_fmt(v['cpu'], 2)} |" for e, v in s["engines"].items()]
    if results["targets"]:
        t3, tl = results["targets"]["spark_within_3x_of_duckdb"], results["targets"]["scaling_no_worse_than_linear"]
        verdict = lambda t: "met" if t["met"] else ("not measured" if t["met"] is None else "NOT met")  # noqa: E731
        lines += ["", "Targets:", "",
                  f"- Spark within {t3['threshold']:g}x of DuckDB at {t3['at_events']:,} events (wall): "
                  f"real job {_fmt(t3['spark']['ratio'], 2)}x {verdict(t3['spark'])}; "
                  f"--no-validation {_fmt(t3['spark_no_validation']['ratio'], 2)}x {verdict(t3['spark_no_validation'])}",
                  f"- Scaling no worse than linear ({tl['threshold']:g}x): "
                  + "; ".join(f"{ENGINE_LABELS[e]} {_fmt(tl[e]['ratio'], 2)}x {verdict(tl[e])}" for e in ENGINES)]
    lines += ["", "Where the time goes (median seconds per stage, from the job logs):", ""]
    for engine in ENGINES:
        names = list(dict.fromkeys(n for size in results["sizes"].values() for n in size["engines"][engine]["median_stages_s"]))
        if not names:
            continue
        lines += [f"| events | {ENGINE_LABELS[engine]}: " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for events, size in results["sizes"].items():
            stages = size["engines"][engine]["median_stages_s"]
            lines.append(f"| {int(events):,} | " + " | ".join(_fmt(stages.get(n)) for n in names) + " |")
        lines.append("")
    problems = results["problems"]
    lines += ["Checks: " + ("DuckDB's interactions per split equal every Spark manifest's `counts.interactions_by_split`; "
                            "all tables equal." if not problems else f"{len(problems)} problem(s):")]
    lines += [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def run_benchmark(sizes: Sequence[int], repeats: int, keep_data: bool) -> dict:
    """Generate, run every engine ``repeats`` times per size, check, and summarize.

    Returns:
        The results written to ``bench/results/features.json``.
    """
    cfg = load_config({"features": {"window_days": WINDOW_DAYS}}).features
    runners: dict[str, Callable[[Path, Path, Path], dict]] = {
        "spark": lambda raw, out, stem: run_spark(raw, out, stem, validate=True),
        "spark_no_validation": lambda raw, out, stem: run_spark(raw, out, stem, validate=False),
        "duckdb": run_duckdb,
    }
    results = {
        "benchmark": "features",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            "ds": DS.isoformat(), "window_days": WINDOW_DAYS, "seed": SEED, "repeats": repeats,
            "spark_master": SPARK_MASTER, "duckdb_threads": DUCKDB_THREADS, "rss_poll_seconds": POLL_SECONDS,
            "feature_config": dataclasses.asdict(cfg),
        },
        "sizes": {},
        "problems": [],
    }
    for events in sizes:
        raw_root, data = ensure_synthetic_logs(events)
        log.info("%d events: raw log at %s (%s)", events, raw_root, data)
        out_dir = WORK_DIR / f"out-{events}"
        shutil.rmtree(out_dir, ignore_errors=True)
        runs: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
        for repeat in range(repeats):
            # Rotate the order so that each engine takes each slot as often as the others.
            for engine in ENGINES[repeat % len(ENGINES):] + ENGINES[:repeat % len(ENGINES)]:
                out_root = out_dir / f"{engine}-{repeat}"
                record = runners[engine](raw_root, out_root, WORK_DIR / "logs" / f"{events}-{engine}-{repeat}")
                runs[engine].append(record)
                log.info("%d events, %s run %d: wall %.1fs, job %s s, CPU %.1fs, peak RSS %.0f MB%s", events, engine, repeat,
                         record["wall_s"], record["job_s"], record["cpu_s"], record["peak_rss_mb"], " FAILED" if "error" in record else "")
                if repeat > 0:  # the first run's output is kept for the table comparison
                    shutil.rmtree(out_root, ignore_errors=True)
        first = {e: out_dir / f"{e}-0" / f"ds={DS}" for e in ("spark", "duckdb")}
        checks, problems = check_size(runs, *(first[e] if first[e].is_dir() else None for e in ("spark", "duckdb")))
        for problem in problems:
            log.warning("%d events: %s", events, problem)
        results["problems"] += [f"{events:,} events: {p}" for p in problems]
        engines = {engine: summarize_engine(runs[engine], events) for engine in ENGINES}
        results["sizes"][str(events)] = {"data": data, "engines": engines, "ratios": size_ratios(engines), "checks": checks}
        shutil.rmtree(out_dir, ignore_errors=True)
        if not keep_data:
            shutil.rmtree(raw_root, ignore_errors=True)
    results["scaling"], results["targets"] = scaling_and_targets({int(k): v for k, v in results["sizes"].items()})
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="events per synthetic log")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="runs per size and engine (medians are reported)")
    parser.add_argument("--keep-data", action="store_true", help="keep the generated raw logs in bench/work/ for the next run")
    # Internal mode: one DuckDB run, measured from the parent like the Spark job.
    parser.add_argument("--duckdb-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--ds", type=dt.date.fromisoformat, default=DS, help=argparse.SUPPRESS)
    parser.add_argument("--window-days", type=int, default=WINDOW_DAYS, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=DUCKDB_THREADS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.duckdb_only and not (args.raw and args.out):
        parser.error("--duckdb-only needs --raw and --out")
    if args.repeats < 1 or any(size < 1 for size in args.sizes):
        parser.error("--repeats and --sizes must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints the Markdown table and writes ``bench/results/features.{json,md}``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.duckdb_only:
        cfg = load_config({"features": {"window_days": args.window_days}}).features
        print(json.dumps(extract_features_duckdb(args.raw, args.out, args.ds, cfg, args.threads)))
        return 0
    results = run_benchmark(args.sizes, args.repeats, args.keep_data)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "features.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = render_markdown(results)
    (RESULTS_DIR / "features.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
