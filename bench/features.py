"""Benchmark the Spark feature job against the same aggregation in DuckDB, side by side.

Run as ``.venv/bin/python bench/features.py [--sizes 1000000 10000000] [--repeats 3]
[--out bench/results/features]``.

For each size it generates a synthetic raw log once (under ``bench/work/``), then runs,
``--repeats`` times and in a rotating order so that noise from a shared machine spreads
evenly over the engines:

* ``spark``: ``python -m spark_jobs.extract_features ... --master local[2]``, exactly as
  users run it, GX validation on (the real job);
* ``spark_no_validation``: the same with ``--no-validation`` (the same work as DuckDB);
* ``duckdb``: :func:`bench.feature_duckdb.extract_features_duckdb`, the job's aggregation
  written in SQL, run in a subprocess of this script (``--duckdb-only``) so that both are
  measured alike.

Every engine is measured the same way (:mod:`bench.process_measure`): wall time of the
process (start-up included), and peak RSS and CPU time summed over its process tree (the
JVM is a child of the Spark job's Python). "Job time" leaves start-up out: the Spark job's
own ``wrote ... in X.Xs`` log line, DuckDB's time from connecting to the last write.
Spark's stages are read off the timestamps of the job's log lines.

Check: DuckDB's interactions per split must equal every Spark manifest's
``counts.interactions_by_split``; the first run of each engine is also compared table by
table (:func:`bench.feature_results.compare_outputs`). A mismatch is recorded in the
results, not raised.

Results go to ``<out>.json`` (every run, medians, ratios, targets, output checks) and
``<out>.md`` (the same tables as printed); ``--out`` defaults to ``bench/results/features``.
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
from pathlib import Path
from typing import Callable, Sequence

from bench.feature_duckdb import DUCKDB_THREADS, extract_features_duckdb
from bench.feature_results import (
    ENGINES,
    check_size,
    machine_info,
    render_markdown,
    scaling_and_targets,
    size_ratios,
    summarize_engine,
)
from bench.process_measure import POLL_SECONDS, measure_process, parse_spark_log
from pipeline.catalog import MANIFEST, date_partition
from pipeline.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]

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


# ----------------------------------------------------------------------------- running the engines


def run_spark(raw_root: Path, out_root: Path, log_stem: Path, validate: bool) -> dict:
    """Run the Spark job as users do and read its manifest."""
    command = [
        sys.executable, "-m", "spark_jobs.extract_features", "--raw", str(raw_root), "--out", str(out_root),
        "--ds", DS.isoformat(), "--window-days", str(WINDOW_DAYS), "--master", SPARK_MASTER,
    ] + ([] if validate else ["--no-validation"])
    measured = measure_process(command, log_stem, REPO_ROOT)
    job_s, stages = parse_spark_log(measured.stderr, measured.wall_s)
    record = {"wall_s": measured.wall_s, "job_s": job_s, "cpu_s": measured.cpu_s, "peak_rss_mb": measured.peak_rss_mb, "stages": stages,
              "returncode": measured.returncode, "log": str(log_stem.relative_to(REPO_ROOT)) + ".err"}
    manifest_path = date_partition(out_root, DS.isoformat()) / MANIFEST
    if measured.returncode != 0 or not manifest_path.exists():
        record["error"] = _tail(measured.stderr)
        return record
    manifest = json.loads(manifest_path.read_text())
    record["counts"] = manifest["counts"]
    record["table_rows"] = {name: table["rows"] for name, table in manifest["tables"].items()}
    return record


def run_duckdb(raw_root: Path, out_root: Path, log_stem: Path) -> dict:
    """Run :func:`~bench.feature_duckdb.extract_features_duckdb` in a subprocess of this script, measured like Spark."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--duckdb-only", "--raw", str(raw_root), "--duckdb-out", str(out_root),
        "--ds", DS.isoformat(), "--window-days", str(WINDOW_DAYS), "--threads", str(DUCKDB_THREADS),
    ]
    measured = measure_process(command, log_stem, REPO_ROOT)
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


# ----------------------------------------------------------------------------- synthetic data


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


# ----------------------------------------------------------------------------- main


def run_benchmark(sizes: Sequence[int], repeats: int, keep_data: bool) -> dict:
    """Generate, run every engine ``repeats`` times per size, check, and summarize.

    Returns:
        The results that :func:`main` writes to ``<out>.json``.
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
        first = {e: date_partition(out_dir / f"{e}-0", DS.isoformat()) for e in ("spark", "duckdb")}
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
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "features",
                        help="where the results go: <out>.json and <out>.md (default: %(default)s)")
    # Internal mode: one DuckDB run, measured from the parent like the Spark job.
    parser.add_argument("--duckdb-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw", help=argparse.SUPPRESS)
    parser.add_argument("--duckdb-out", help=argparse.SUPPRESS)
    parser.add_argument("--ds", type=dt.date.fromisoformat, default=DS, help=argparse.SUPPRESS)
    parser.add_argument("--window-days", type=int, default=WINDOW_DAYS, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=DUCKDB_THREADS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.duckdb_only and not (args.raw and args.duckdb_out):
        parser.error("--duckdb-only needs --raw and --duckdb-out")
    if args.repeats < 1 or any(size < 1 for size in args.sizes):
        parser.error("--repeats and --sizes must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints the Markdown tables and writes ``<out>.json`` and ``<out>.md``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.duckdb_only:
        cfg = load_config({"features": {"window_days": args.window_days}}).features
        print(json.dumps(extract_features_duckdb(args.raw, args.duckdb_out, args.ds, cfg, args.threads)))
        return 0
    results = run_benchmark(args.sizes, args.repeats, args.keep_data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_name(args.out.name + ".json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = render_markdown(results)
    args.out.with_name(args.out.name + ".md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
