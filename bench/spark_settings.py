"""The feature job's local Spark settings, measured: AQE on or off, driver memory 4g or 2g.

``.venv/bin/python bench/spark_settings.py [--events 3000000] [--repeats 1]``

Each setting runs the real job (GX on, ``local[2]``, the default shuffle partitions) in its
own process on the same synthetic log (:func:`bench.features.ensure_synthetic_logs`),
settings interleaved round by round; wall time, CPU time and peak RSS of the process tree
(JVM included) by :mod:`bench.process_measure`. Results: ``bench/results/spark_settings.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Sequence

from bench.feature_results import machine_info
from bench.features import DS, WINDOW_DAYS, WORK_DIR, ensure_synthetic_logs
from bench.process_measure import measure_process

REPO_ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {"aqe on, driver 4g": ("true", "4g"), "aqe off, driver 4g": ("false", "4g"), "aqe on, driver 2g": ("true", "2g")}


def run_job(aqe: str, driver_memory: str, raw_root: str, out_root: str) -> None:
    """One feature job with the given ``spark.sql.adaptive.enabled`` and ``spark.driver.memory``."""
    import dataclasses
    import shutil

    from pipeline.config import FeatureConfig
    from pipeline.spark import spark_session
    from spark_jobs import extract_features as job

    shutil.rmtree(out_root, ignore_errors=True)
    cfg = dataclasses.replace(FeatureConfig(), window_days=WINDOW_DAYS)
    conf = {**job.session_conf(cfg), "spark.driver.memory": driver_memory, "spark.sql.adaptive.enabled": aqe, "spark.ui.enabled": "false"}
    spark = spark_session("spark_settings", "local[2]", cfg.shuffle_partitions, conf=conf)
    try:
        job.run(spark, raw_root, out_root, DS, cfg)
    finally:
        spark.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=3_000_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", nargs=4, metavar=("AQE", "DRIVER_MEMORY", "RAW", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_job(*args.child)
        return 0
    raw_root, data = ensure_synthetic_logs(args.events)
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for round_ in range(args.repeats):
        for name, (aqe, memory) in SETTINGS.items():
            command = [sys.executable, str(Path(__file__).resolve()), "--child", aqe, memory, str(raw_root), str(WORK_DIR / "settings-out")]
            m = measure_process(command, WORK_DIR / "logs" / f"spark-settings-{aqe}-{memory}-{round_}", REPO_ROOT)
            if m.returncode:
                raise SystemExit(f"{name} failed:\n{m.stderr[-3000:]}")
            runs[name].append({"wall_s": round(m.wall_s, 1), "cpu_s": round(m.cpu_s, 1), "peak_rss_mb": round(m.peak_rss_mb)})
            print(name, runs[name][-1], flush=True)
    results = {"benchmark": "feature job local settings", "events": args.events, "data": data, "machine": machine_info(),
               "runs": runs, "median_wall_s": {name: statistics.median(r["wall_s"] for r in rows) for name, rows in runs.items()}}
    out = REPO_ROOT / "bench" / "results" / "spark_settings.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
