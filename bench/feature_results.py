"""What a benchmark run found: output checks, medians, ratios, targets, and the Markdown report.

:func:`check_size` compares Spark's interactions per split with DuckDB's and the two
engines' first outputs table by table (:func:`compare_outputs`); :func:`summarize_engine`,
:func:`size_ratios` and :func:`scaling_and_targets` reduce the runs to medians, ratios
and the two targets; :func:`render_markdown` turns the results into the printed tables.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

from bench.feature_duckdb import DUCKDB_THREADS, sql_string
from pipeline.data.contract import EVENT_TYPES

ENGINES = ("spark", "spark_no_validation", "duckdb")
ENGINE_LABELS = {"spark": "Spark (GX on, the real job)", "spark_no_validation": "Spark --no-validation", "duckdb": "DuckDB (same work)"}
TARGET_SPARK_OVER_DUCKDB = 3.0  # at the largest size

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
            con.execute(f"CREATE OR REPLACE TEMP VIEW {side} AS SELECT *, true AS _present FROM read_parquet({sql_string(pattern)}, hive_partitioning = true)")
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


def render_markdown(results: dict) -> str:
    """The results as Markdown tables: per size and engine, ratios, scaling, targets, stages, checks."""
    machine, settings = results["machine"], results["settings"]
    lines = [
        "# Feature job benchmark: Spark vs DuckDB",
        "",
        f"{results['date']} · {machine['nproc']} cores ({machine['cpu']}), {machine['memory_gb']} GB · Python {machine['python']}, "
        f"PySpark {machine['pyspark']} ({settings['spark_master']}), DuckDB {machine['duckdb']} (threads={settings['duckdb_threads']}) · "
        f"ds {settings['ds']}, window {settings['window_days']} days · medians of {settings['repeats']} runs "
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
