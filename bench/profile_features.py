"""Where the feature job's time goes: one run with a Spark event log, summarised by SQL execution.

``.venv/bin/python bench/profile_features.py [--events 10000000]`` runs the real job (GX on,
``local[2]``, the configured settings) once on the synthetic log of that size (made by
:func:`bench.features.ensure_synthetic_logs` if missing) and writes
``bench/results/profile_features_<events>.json``: every SQL execution in order (start offset,
wall seconds, Spark's description), the slowest stages (their SQL execution, wall,
executor-run and GC seconds, and the physical operators they ran), and the executor and GC
seconds of the whole run.
Descriptions name Spark's call site (``count``, ``collect`` in GX, ``parquet`` for a write), so
read them in order beside the job's log lines. One run: for finding work, not for quoting speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

from bench.features import DS, WINDOW_DAYS, ensure_synthetic_logs
from pipeline.config import load_config
from pipeline.spark import spark_session
from spark_jobs.extract_features import run, session_conf

REPO_ROOT = Path(__file__).resolve().parents[1]

RESULTS_DIR = REPO_ROOT / "bench" / "results"


def summarise_event_log(path: Path, top_stages: int = 40) -> dict:
    """SQL executions in order and the slowest stages, from one uncompressed Spark event log."""
    starts, executions, stages, execution_of_stage = {}, [], [], {}
    with path.open() as lines:  # not splitlines(): JSON strings may hold other Unicode line breaks
        events = [json.loads(line) for line in lines if line.strip()]
    for event in events:
        kind = event["Event"]
        if kind.endswith("SQLExecutionStart"):
            starts[event["executionId"]] = (event["time"], event.get("description", ""))
        elif kind.endswith("SQLExecutionEnd") and event["executionId"] in starts:
            started, description = starts[event["executionId"]]
            executions.append({"id": event["executionId"], "start_ms": started,
                               "wall_s": (event["time"] - started) / 1000, "description": description})
        elif kind == "SparkListenerJobStart":
            execution = (event.get("Properties") or {}).get("spark.sql.execution.id")
            for stage_id in event.get("Stage IDs", []):
                execution_of_stage.setdefault(stage_id, int(execution) if execution is not None else None)
        elif kind == "SparkListenerStageCompleted":
            info = event["Stage Info"]
            metric = lambda name: sum(a.get("Value", 0) for a in info.get("Accumulables", []) if a.get("Name") == name)  # noqa: E731
            run_ms, gc_ms = metric("internal.metrics.executorRunTime"), metric("internal.metrics.jvmGCTime")
            stages.append({"id": info["Stage ID"], "sql_execution": execution_of_stage.get(info["Stage ID"]), "name": info["Stage Name"],
                           "tasks": info["Number of Tasks"], "wall_s": (info["Completion Time"] - info["Submission Time"]) / 1000,
                           "executor_run_s": run_ms / 1000, "gc_s": gc_ms / 1000, "operators": _operators(info)})
    first = min((e["start_ms"] for e in executions), default=0)
    for e in executions:
        e["offset_s"] = round((e.pop("start_ms") - first) / 1000, 1)
    return {"executor_run_s": round(sum(s["executor_run_s"] for s in stages), 1), "gc_s": round(sum(s["gc_s"] for s in stages), 1),
            "sql_executions": sorted(executions, key=lambda e: e["id"]),
            "slowest_stages": sorted(stages, key=lambda s: -s["wall_s"])[:top_stages]}


def _operators(stage_info: dict) -> list[str]:
    """The physical operators a stage ran (the scopes of its RDDs, e.g. ``Exchange``, ``HashAggregate``)."""
    names = set()
    for rdd in stage_info.get("RDD Info", []):
        try:
            names.add(json.loads(rdd.get("Scope") or "{}").get("name", ""))
        except json.JSONDecodeError:
            continue
    return sorted(n for n in names if n)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="events in the synthetic log")
    args = parser.parse_args(argv)
    raw_root, _ = ensure_synthetic_logs(args.events)
    cfg = load_config({"features": {"window_days": WINDOW_DAYS}}).features
    with tempfile.TemporaryDirectory() as scratch:
        log_dir, out = Path(scratch) / "eventlog", Path(scratch) / "features"
        log_dir.mkdir()
        spark = spark_session("profile_features", "local[2]", cfg.shuffle_partitions, conf={
            **session_conf(cfg), "spark.eventLog.enabled": "true",
            "spark.eventLog.dir": log_dir.as_uri(), "spark.eventLog.compress": "false",
            "spark.eventLog.rolling.enabled": "false"})
        spark.sparkContext.setLogLevel("WARN")
        started = time.perf_counter()
        try:
            run(spark, raw_root, out, DS, cfg)
        finally:
            seconds = time.perf_counter() - started
            spark.stop()
        (log_file,) = [p for p in log_dir.rglob("*") if p.is_file()]
        summary = summarise_event_log(log_file)
        shutil.rmtree(out, ignore_errors=True)
    result = {"benchmark": "profile_features", "events": args.events, "job_s": round(seconds, 1), **summary}
    path = RESULTS_DIR / f"profile_features_{args.events}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for e in result["sql_executions"]:
        if e["wall_s"] >= 0.5:
            print(f"+{e['offset_s']:6.1f} s {e['wall_s']:6.1f} s  #{e['id']:<3} {e['description'][:90]}")
    print(f"job {result['job_s']} s; executors ran {result['executor_run_s']} s, of it GC {result['gc_s']} s; "
          f"{len(result['sql_executions'])} SQL executions; written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
